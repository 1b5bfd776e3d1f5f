"""Fine-tuning: the base model's weights and the LoRA adapter trained on a task's dataset."""
