"""A PyTorch model for the local-model benchmark: a tiny GPT-like stack with
random weights, built by the script (nothing is downloaded).

It behaves as PyTorch plugins such as llm-mrchatterbox do: it imports torch
inside ``execute()``, builds about 470 MB of float32 weights on first use and
keeps them on the instance, and decodes one token at a time with matrix-vector
products that torch runs on its intra-op thread pool, GIL released.
"""

from __future__ import annotations

import llm

LAYERS = 12
WIDTH = 1024
VOCAB = 8192


class TinyGPT(llm.Model):
    model_id = "tiny-gpt"
    can_stream = True

    class Options(llm.Options):
        tokens: int = 32

    def __init__(self):
        self.net = None

    def _load(self):
        import torch

        torch.manual_seed(0)
        blocks = []
        for _ in range(LAYERS):
            blocks += [
                torch.nn.LayerNorm(WIDTH),
                torch.nn.Linear(WIDTH, 4 * WIDTH),
                torch.nn.GELU(),
                torch.nn.Linear(4 * WIDTH, WIDTH),
            ]
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.net = torch.nn.Sequential(*blocks).eval()
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)

    def execute(self, prompt, stream, response, conversation):
        import torch

        if self.net is None:
            self._load()
        token = sum(map(ord, prompt.prompt or "")) % VOCAB
        with torch.inference_mode():
            for _ in range(prompt.options.tokens):
                hidden = self.net(self.embed(torch.tensor([token])))
                token = int(self.head(hidden).argmax())
                yield f"t{token} "
        response.set_usage(input=1, output=prompt.options.tokens)


@llm.hookimpl
def register_models(register):
    register(TinyGPT())


def register_plugin() -> None:
    import sys

    if not llm.pm.has_plugin("procpool-local-models"):
        llm.pm.register(sys.modules[__name__], name="procpool-local-models")
