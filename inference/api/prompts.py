"""Turn a validated request into prompt token ids and sampling parameters, or a clear 400."""

from __future__ import annotations

from typing import Any

from ..engine.request import SamplingParams
from ..model.loader import LoadedModel
from .errors import ApiError
from .schemas import ChatCompletionRequest, CompletionRequest, _GenerationParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def chat_prompt_ids(
    loaded: LoadedModel, messages: list[dict[str, Any]], tokenizer: Any = None
) -> tuple[list[int], str]:
    """Token ids of a chat prompt without images (``messages`` as read by read_messages), with
    ``tokenizer``: a copy of the model's that this thread alone uses (the API's, from its
    pool), or the model's own."""
    tokenizer = loaded.tokenizer if tokenizer is None else tokenizer
    if not loaded.has_chat_template:
        raise ApiError(
            400,
            f"the model {loaded.name!r} has no chat template; use "
            "/v1/completions with a prompt instead",
            param="messages",
        )
    owner = tokenizer
    if len(messages) > loaded.context_length:  # each message costs a token at least
        raise too_long(loaded, f"{len(messages)} messages", len(messages), "messages")
    if not getattr(owner, "chat_template", None) and loaded.processor is not None:
        owner = loaded.processor  # the template came with the processor only
    try:
        prompt = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - templates raise what they like (jinja errors)
        raise ApiError(
            400, f"the model's chat template rejected the messages: {exc}", param="messages"
        ) from None
    refuse_before_tokenizing(loaded, prompt, "messages")
    # The template wrote any special tokens (BOS and the like) itself.
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids, prompt


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in chat messages as read by read_messages (before the template)."""
    total = 0
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            total += len(content)
        else:
            total += sum(len(part.get("text", "")) for part in content)
    return total


def refuse_before_tokenizing(loaded: LoadedModel, text: str, param: str) -> None:
    """A 400 for a text too long for the context whatever its tokens, before tokenizing it: a
    megabyte prompt would otherwise hold a tokenizer and a CPU for seconds only to be
    refused."""
    at_least = -(-len(text) // max(loaded.max_token_chars, 1))
    if at_least >= loaded.context_length:
        raise too_long(loaded, f"{len(text)} characters", at_least, param)


def too_long(loaded: LoadedModel, size: str, at_least: int, param: str) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {loaded.context_length} tokens, but the "
        f"prompt has {size}, at least {at_least} tokens; shorten the prompt",
        param=param,
        code="context_length_exceeded",
    )


def completion_prompt_ids(
    loaded: LoadedModel, body: CompletionRequest, tokenizer: Any = None
) -> tuple[list[int], str]:
    """Token ids of a completion's prompt (text, or token ids checked against the vocabulary),
    with ``tokenizer`` as for chat_prompt_ids."""
    tokenizer = loaded.tokenizer if tokenizer is None else tokenizer
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = loaded.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(
                400,
                f"'prompt': token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})",
                param="prompt",
            )
        return list(prompt), tokenizer.decode(prompt)
    text = prompt[0] if isinstance(prompt, list) else prompt
    refuse_before_tokenizing(loaded, text, "prompt")
    ids = tokenizer(text)["input_ids"]
    return ids, text


def completion_chars(body: CompletionRequest) -> int:
    """How long a completion's prompt is: characters of text, or token ids."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return len(prompt)
    if prompt and isinstance(prompt[0], str):
        return len(prompt[0])
    return len(prompt)


def sampling_params(
    loaded: LoadedModel, body: _GenerationParams, prompt_tokens: int, max_tokens_limit: int
) -> SamplingParams:
    context = loaded.context_length
    prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    if prompt_tokens == 0:
        raise ApiError(400, "the prompt is empty: it encodes to no tokens", param=prompt_param)
    if prompt_tokens >= context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens, but the "
            f"prompt has {prompt_tokens} tokens; shorten the prompt",
            param=prompt_param,
            code="context_length_exceeded",
        )
    requested = body.requested_max_tokens
    name = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
    if requested is None and not isinstance(body, ChatCompletionRequest):
        # OpenAI's completions default: 16 tokens (chat's is the rest of the context).
        max_tokens = min(COMPLETIONS_DEFAULT_MAX_TOKENS, max_tokens_limit, context - prompt_tokens)
    elif requested is None:
        max_tokens = min(max_tokens_limit, context - prompt_tokens)
    else:
        if requested < 1:
            raise ApiError(400, f"'{name}' must be at least 1, got {requested}", param=name)
        if requested > max_tokens_limit:
            raise ApiError(
                400,
                f"'{name}' is {requested}, above this server's limit of {max_tokens_limit}",
                param=name,
            )
        if prompt_tokens + requested > context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens, but "
                f"{prompt_tokens + requested} were requested ({prompt_tokens} in the "
                f"prompt, {requested} for the completion); lower '{name}' or shorten "
                "the prompt",
                param=name,
                code="context_length_exceeded",
            )
        max_tokens = requested
    if body.min_tokens > max_tokens:
        raise ApiError(
            400,
            f"'min_tokens' ({body.min_tokens}) is above the maximum of {max_tokens} tokens",
            param="min_tokens",
        )
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0.0:  # nothing may be sampled but the most likely token: greedy
        temperature, top_p = 0.0, 1.0
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        temperature=temperature,
        top_p=top_p,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        stop=body.stop_sequences,
        ignore_eos=body.ignore_eos,
    )
