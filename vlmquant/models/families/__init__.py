"""One module per model family, named after its Hugging Face `model_type` (config.json), defining
`ADAPTER`, an instance of a vlmquant.models.base.Adapter subclass. A module here is a family: the
config schema, model-type detection, the demo builders and the tests all read this folder."""
