"""Interoperability with other model formats: Hugging Face transformers (`zoo.interop.hf`)."""
