"""Conversion and quantization: base GGUFs, PEFT adapters to GGUF LoRA, ONNX int8 encoders."""
