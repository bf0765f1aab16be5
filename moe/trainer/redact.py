"""Masking of secret-looking config values in what the trainer writes out.

A config (mostly the free-form ``model`` / ``data`` sections of a custom task) may hold
an access token or a password. The config dumps meant for people and logs mask their
values: ``<out_dir>/config.yaml`` and ``python -m moe.train --print-config``.

The rule (``is_secret_key``): the key is split into words at ``_``, ``-``, ``.``,
spaces and lower-to-upper case changes (``hfToken`` -> hf, token), lower-cased; the
key is secret when its LAST word is one of ``SECRET_WORDS`` (token, key, secret,
password, passwd, passphrase, apikey, credential, credentials). So ``token``,
``hf_token``, ``api_key``, ``accessToken``, ``db_password`` and ``client_secret`` are
masked, while ``top_k``, ``key_padding_mask``, ``keep_checkpoints``, ``tokenizer``,
``num_tokens`` and ``secret_path`` are not: a word inside a key, or a longer word
that starts like one, does not count. The tokenizer's special-token names
(``pad_token``, ``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``,
``cls_token``, ``mask_token``) are not secrets either.

A secret key's value is replaced by ``MASK`` whatever it holds (a string, a number, a
list, a mapping); ``None`` stays ``None`` (nothing to hide). Mappings inside lists are
searched too. Checkpoints keep the plain config (``trainer.json``): they are not logs.
"""
from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "SECRET_WORDS", "is_secret_key", "redact"]

MASK = "***"
SECRET_WORDS = frozenset({"token", "key", "secret", "password", "passwd", "passphrase", "apikey", "credential",
                          "credentials"})
_SPECIAL_TOKENS = frozenset({"pad", "bos", "eos", "unk", "sep", "cls", "mask"})
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[_\-.\s]+")


def _words(key: str):
    return [w.lower() for w in _SEPARATORS.split(_CAMEL.sub("_", key)) if w]


def is_secret_key(key: Any) -> bool:
    """Whether a config key names a secret (see the module doc for the rule)."""
    if not isinstance(key, str):
        return False
    words = _words(key)
    if not words or words[-1] not in SECRET_WORDS:
        return False
    return not (len(words) == 2 and words[1] == "token" and words[0] in _SPECIAL_TOKENS)


def redact(value: Any) -> Any:
    """A copy of plain config data (mappings, lists, scalars) with secret keys' values masked."""
    if isinstance(value, dict):
        return {k: (MASK if v is not None else None) if is_secret_key(k) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value
