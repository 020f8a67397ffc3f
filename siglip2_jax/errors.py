"""How the project reports a failure: an error of its own class whose message is one line naming the
culprit (a file, a flag, a model), e.g. `ImageError("cat.jpg: not an image (cannot identify image file)")`.
The classes live beside the code that raises them (ConfigError in config.py, ImageError in images.py...);
`siglip2_jax.commands` maps them to exit statuses.
"""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, to quote inside one of ours (a library's messages can run to many
    lines); its class name if the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
