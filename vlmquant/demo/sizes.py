"""Sizes of the demo models (no torch: the workflow reads them when it loads, before a demo model is built)."""

# the text model of every family: 4 layers, width 256, MLP 768, 4 query and 4 key/value heads
TEXT_SIZES = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=4096)
VISION_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
