"""How ctcd's blocks look in the Prefect UI: their logos and their forms.

Logos: Prefect's own block logos (256x256 PNGs, the set the installed Prefect 3.9.1 links
to, pinned to the same commit): `process` for the local MLflow deployer (it runs local
processes), `kubernetes` for Seldon, `aws` for S3-compatible object stores, `secret` for Vault
credentials and `webhook` for the MLflow tracking server (an HTTP service with credentials).
The browser loads them from GitHub; with no network the UI shows the block's name without it.

Forms: Prefect's V1 UI (the one its run links open) shows an `X | None` field as tabs, one per
type in the JSON schema's `anyOf`, and opens on the FIRST tab unless the saved value is a nested
object. For an optional nested block or model (`vault: VaultCredentials | None`) pydantic lists
the nested type first, so a form saved with no block chosen stores `{}`, which then fails to load
("vault.address Field required"), and the Edit form reopens on that tab, so every later save
breaks it again. Listing `null` first makes "none" the tab a new or re-opened form starts on; a
saved block reference still opens on its own tab (the UI matches a value to its type), and
Prefect's V2 UI, which selects by value, is unaffected. The order of `anyOf` changes nothing
else: validation and `Block.load` read it as a set. (Plain optional strings and secrets keep
their order: an empty first tab saves nothing, which loads as None.)

Prefect 3.9.1's V2 UI has a flaw no schema avoids: its Edit form saves a nested block (a chosen
Vault, object store or cluster) as an inline copy instead of the reference, with each secret of
the copy replaced by Prefect's mask `********`. `refuse_masked` makes such a block fail to load
with that said, instead of failing later as a wrong token or key. Edit blocks that hold other
blocks in the V1 UI (ctcd's own server opens it by default), or from Python.
"""

from __future__ import annotations

from typing import Any

from prefect.utilities.names import obfuscate
from pydantic import BaseModel, Field, HttpUrl, SecretStr, ValidationError

MASK = obfuscate("any secret")  # "********": what Prefect shows and sends instead of a secret

LOGOS = (
    "https://raw.githubusercontent.com/PrefectHQ/prefect/"
    "420d0d6a78bb6df1fc18bcf188fdad43c1d22ea9/assets/block-logos/"
)


def logo(name: str) -> HttpUrl:
    """The URL of Prefect's block logo `name` (`process`, `kubernetes`, `aws`, ...)."""
    return HttpUrl(f"{LOGOS}{name}.png")


def null_first(schema: dict[str, Any]) -> None:
    """`json_schema_extra` for an optional nested field: `null` first in its `anyOf`."""
    if "anyOf" in schema:
        schema["anyOf"].sort(key=lambda variant: variant.get("type") != "null")


def optional_nested(title: str, description: str) -> Any:
    """The `Field` of an optional nested block or model (default None), as the UI needs it:
    `null` listed first, and a title (Prefect's schema has none for a block reference, so the
    V2 form would label it "Field")."""
    return Field(default=None, title=title, description=description, json_schema_extra=null_first)


def refuse_masked(block: BaseModel) -> None:
    """Refuse a block whose secret is Prefect's mask, naming the field and what to do."""
    for name in type(block).model_fields:
        value = getattr(block, name)
        if isinstance(value, SecretStr) and value.get_secret_value() == MASK:
            raise ValueError(
                f"{type(block).__name__}.{name} holds {MASK}, Prefect's mask for a hidden "
                "secret, not the secret: this block was saved from a form that had only the "
                "mask (Prefect 3.9's V2 UI Edit form saves a nested block that way). Choose the "
                "saved block again in the V1 UI's Edit form, or save the block from Python."
            )


def invalid_saved_block(err: RuntimeError, kind: str, name: str) -> str | None:
    """Why a saved block does not load, when `Block.load` failed its validation (it raises a
    RuntimeError from the ValidationError); None for any other RuntimeError."""
    cause = err.__cause__
    if not isinstance(cause, ValidationError):
        return None
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'the block'}: {e['msg']}" for e in cause.errors()
    )
    return (
        f"The saved {kind} '{name}' does not load: {problems}. Fix it in the Prefect UI "
        "(Blocks, the block, Edit) or save it again from Python."
    )
