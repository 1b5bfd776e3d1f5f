"""Training data: collected traces read, labelled in each task's exact form, deduplicated, split and tokenized."""
