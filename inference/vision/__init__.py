"""Vision-language chat: image parts of OpenAI messages, decoded and prepared for the model."""
