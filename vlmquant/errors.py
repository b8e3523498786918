"""The one error type users see: a single line naming the file/key/layer and what to do."""


class VlmquantError(ValueError):
    """Bad input or inconsistent state. The message is one line and names its subject."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
