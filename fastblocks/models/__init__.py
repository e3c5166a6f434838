"""Model builders with torchvision's names and arguments. One import line per file."""
