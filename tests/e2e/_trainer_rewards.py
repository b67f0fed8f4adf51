"""A reward with variance even for an untrained model, so the trainer tests see gradients."""


def digit_share(completions, **columns):
    """Fraction of characters that are digits (strings or chat-message completions)."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else "".join(m.get("content", "") for m in c)
        out.append(sum(ch.isdigit() for ch in text) / max(1, len(text)))
    return out
