"""The data room: sources (one contract: an example or a dead input), host preprocessing, the embedding dataset."""
