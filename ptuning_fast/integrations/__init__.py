"""Integrations with Hugging Face transformers and PEFT."""
