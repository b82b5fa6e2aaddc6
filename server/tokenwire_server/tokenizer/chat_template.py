"""Chat templates: the checkpoint's jinja2 template, rendered in jinja2's sandbox."""

from __future__ import annotations

import json
import re
import secrets

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import CheckpointError, InvalidArgument

ROLES = ("system", "user", "assistant", "tool")


class TemplateRaised(Exception):
    pass


def _raise(message):
    raise TemplateRaised(message)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = ""):
        # The same environment options as transformers, so templates render identically.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise CheckpointError(origin or "chat template", f"chat template does not parse: {e}") from None
        self.source = source
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def __reduce__(self):  # the compiled template does not pickle; its source does
        return type(self), (self.source, self._tokens["bos_token"], self._tokens["eos_token"])

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise InvalidArgument("messages", "at least one message is required")
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise InvalidArgument(f"messages[{i}].role",
                                      f"unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(m.get("content"), str):
                raise InvalidArgument(f"messages[{i}].content", "content must be text")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._tokens)
        except TemplateRaised as e:
            raise InvalidArgument("messages", f"rejected by the model's chat template: {e}") from None
        except jinja2.TemplateError as e:
            raise InvalidArgument("messages", f"the model's chat template failed: {e}") from None

    def render_parts(self, messages: list[dict],
                     add_generation_prompt: bool = True) -> tuple[str, str, list[str] | None]:
        """Where message content went in the rendering: (plain rendering, marked rendering, parts).
        The marked rendering has every non-empty content between markers holding a fresh random
        nonce, which content cannot guess. parts alternates markup and content (odd indexes are
        content) and joins to the plain rendering; it is None when the template changed content
        (`| trim`, slicing, branching on it) so that its place cannot be told."""
        plain = self.render(messages, add_generation_prompt)
        nonce = secrets.token_hex(16)
        opener, closer = f"[[tw:{nonce}:", f":{nonce}:tw]]"  # no characters that JSON or HTML escape
        marked = self.render([{**m, "content": opener + m["content"] + closer if m["content"] else ""}
                              for m in messages], add_generation_prompt)
        parts = re.split(re.escape(opener) + "(.*?)" + re.escape(closer), marked, flags=re.DOTALL)
        if any(nonce in part for part in parts) or "".join(parts) != plain:
            return plain, marked, None
        return plain, marked, parts
