"""Turning a parsed OpenAI request into engine requests: prompt ids, max_tokens, ``SamplingParams``.

``RequestPlanner`` holds what this needs of the engine (its tokenizer and context window); every refusal is
an ``APIError`` naming the field (400), raised before anything reaches the engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import ValidationError

from llmray.model.tokenizer import UnknownCharactersError, describe_chars
from llmray.serve.errors import APIError, clip, from_validation_error, from_value_error
from llmray.serve.protocol import ChatCompletionRequest, CompletionRequest
from llmray.serve.structured_api import ChatPlan, plan_chat

Job = tuple[int, list[int], Any]  # (choice index, prompt ids, SamplingParams)


class RequestPlanner:
    """Engine requests for an OpenAI request (``n`` choices of each prompt, seeds ``seed + i``)."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def jobs(self, req: CompletionRequest | ChatCompletionRequest) -> tuple[list[Job], ChatPlan | None]:
        """One job per engine request, and the chat plan (None for completions); APIError when refused."""
        plan = self._chat_plan(req) if isinstance(req, ChatCompletionRequest) else None
        jobs = []
        for p_idx, ids in enumerate(self._prompt_ids(req, plan)):
            max_tokens = self._max_tokens(req, len(ids))
            for i in range(req.n):
                jobs.append((p_idx * req.n + i, ids, self._sampling(req, max_tokens, i, plan)))
        return jobs, plan

    @staticmethod
    def parse(kind: str, body: dict[str, Any]) -> CompletionRequest | ChatCompletionRequest:
        model = CompletionRequest if kind == "completions" else ChatCompletionRequest
        try:
            return model.model_validate(body)
        except ValidationError as e:
            raise from_validation_error(e) from None

    def _chat_plan(self, req: ChatCompletionRequest) -> ChatPlan:
        """The rendered prompt (tools, chat_template_kwargs) and the output handling of a chat request."""
        try:
            return plan_chat(req, self.tokenizer)
        except Exception as e:  # jinja TemplateError from a template's raise_exception
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None

    def _prompt_ids(
        self, req: CompletionRequest | ChatCompletionRequest, plan: ChatPlan | None = None
    ) -> list[list[int]]:
        if isinstance(req, ChatCompletionRequest):
            assert plan is not None, "a chat request is encoded from its ChatPlan"
            return [self._encode(plan.prompt, "messages")]
        vocab = self.tokenizer.vocab_size
        out = []
        for p in req.prompts():
            ids = self._encode(p, "prompt") if isinstance(p, str) else list(p)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt"
                )
            if not ids:
                raise APIError(400, "the prompt encodes to zero tokens; send a non-empty prompt", "prompt")
            out.append(ids)
        return out

    def _encode(self, text: str, param: str) -> list[int]:
        """Tokenize client text; a tokenizer that cannot (e.g. a char vocabulary without an unknown token
        meeting an unseen character) is the client's 400, not a 500."""
        try:
            return self.tokenizer.encode(text)
        except UnknownCharactersError as e:
            msg = f"the {param} hold{'' if param == 'messages' else 's'} characters this model's tokenizer"
            raise APIError(
                400, f"{msg} cannot encode: {describe_chars(e.chars)}", param, "unknown_characters"
            ) from None
        except Exception as e:  # tokenizers raises plain Exception for an unknown symbol
            raise APIError(
                400, f"this model's tokenizer cannot encode the {param}: {clip(e, 200)}", param
            ) from None

    def _max_tokens(self, req: CompletionRequest | ChatCompletionRequest, prompt_len: int) -> int:
        chat = isinstance(req, ChatCompletionRequest)  # (a missing attribute of a pydantic model is slow)
        asked_completion = chat and getattr(req, "max_completion_tokens", None)
        param = "max_completion_tokens" if asked_completion else "max_tokens"
        room = self.max_model_len - prompt_len
        asked = req.max_new_tokens()
        if room < 1:  # the prompt alone fills the window: no max_tokens helps
            what = "prompt" if isinstance(req, CompletionRequest) else "messages"
            msg = f"this model's context window of {self.max_model_len} tokens is filled by the {what} alone"
            raise APIError(
                400, f"{msg} ({prompt_len} tokens); shorten the {what}", what, "context_length_exceeded"
            )
        if asked is None:
            return room  # chat default: the rest of the context window
        if asked > room:
            raise APIError(
                400,
                f"this model's context window is {self.max_model_len} tokens, but the prompt has {prompt_len} "
                f"tokens and {param}={asked} ({prompt_len + asked} in all); lower {param} to at most "
                f"{room} or shorten the prompt",
                param,
                code="context_length_exceeded",
            )
        return asked

    def _sampling(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        max_tokens: int,
        i: int,
        plan: ChatPlan | None = None,
    ) -> Any:
        vocab = self.tokenizer.vocab_size
        outside = [t for t in req.stop_token_ids or [] if t >= vocab]
        if outside:  # the engine indexes logits with them (min_tokens masking)
            raise APIError(
                400,
                f"stop_token_ids holds {outside[0]}, outside the vocabulary [0, {vocab})",
                "stop_token_ids",
            )
        try:
            sp = req.to_sampling_params(max_tokens, i)
            if plan is not None and plan.tool_mode == "forced":  # the grammar of the forced tool call
                sp = dataclasses.replace(sp, structured_output=plan.structured_output)
            return sp
        except ValueError as e:  # RequestError: names the field
            raise api_param(from_value_error(e), plan) from None


def api_param(err: APIError, plan: ChatPlan | None) -> APIError:
    """The engine names ``structured_output``; the client sent ``response_format`` or ``tool_choice``."""
    if err.param == "structured_output":
        err.param = "tool_choice" if plan is not None and plan.tool_mode == "forced" else "response_format"
    return err
