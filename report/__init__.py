"""The comparison report: probe vs fine-tune, one table and one plot."""
