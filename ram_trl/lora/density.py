"""When RAM on LoRA task vectors is just averaging, and the message that says so."""

from __future__ import annotations

from ram_trl.errors import InputError


def density_warning(
    changed_fraction: float,
    shared_fraction: float,
    *,
    shared_threshold: float = 0.9,
    changed_threshold: float = 0.99,
    lora: bool = True,
) -> str | None:
    """A message when RAM on these task vectors degenerates into averaging, else ``None``.

    ``changed_fraction``: the fraction of an agent's elements (within the modules considered,
    e.g. the LoRA-adapted ones) with ``|tau| > epsilon``; ``shared_fraction``: the fraction of
    those changed elements that at least one other agent changed too (``shared / changed``, as
    in the probe's per-agent statistics).

    Why: RAM keeps (and, in RAM+, rescales) elements unique to one agent and averages shared
    ones. ``lora_B @ lora_A`` is dense, so a LoRA agent changes nearly every element of each
    module it adapts, two LoRA agents share nearly all of them, and the merge there is just the
    mean of the task vectors. The callback and the probe log this message so that nobody reads
    a LoRA merge as a test of RAM. ``lora=False`` words the message for a dense full fine-tune.
    """
    for value, what in (
        (changed_fraction, "changed_fraction"),
        (shared_fraction, "shared_fraction"),
    ):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{what} must lie in [0, 1], got {value!r}")
    reasons = []
    if changed_fraction >= changed_threshold:
        reasons.append(f"{changed_fraction:.1%} of the elements changed")
    if shared_fraction > shared_threshold:
        reasons.append(
            f"{shared_fraction:.1%} of the changed elements are shared with other agents"
        )
    if not reasons:
        return None
    cause = (
        "This is expected for LoRA agents (lora_B @ lora_A is dense: a LoRA agent changes nearly "
        "every element of each module it adapts). "
        if lora
        else "This full fine-tune is dense, typically from a high learning rate. "
    )
    return (
        " and ".join(reasons)
        + ": RAM's unique/shared split carries almost no information here, so the merge is close "
        "to a plain average of the task vectors. "
        + cause
        + "RAM pays off on sparse, heterogeneous task vectors, such as full fine-tuning at small "
        "learning rates."
    )
