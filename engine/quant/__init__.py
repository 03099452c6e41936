"""Weight quantization: Hearth's canonical quantized-weight layout (``qweight``), the
round-to-nearest quantizers, and the readers/writers of published checkpoint layouts."""
