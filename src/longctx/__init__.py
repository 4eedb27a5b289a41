"""longctx: long-context sequence models you can train, run and measure."""

__version__ = "0.1.0"
