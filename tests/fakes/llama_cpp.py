"""A stand-in for llama-cpp-python, for tests: a ``Llama`` that sizes its thread
counts from the CPU count when it is built, as the real one does, and whose
live context takes new counts through ``_ctx.set_n_threads``, and whose
``eval`` evaluates a prompt's tokens."""

import multiprocessing


class _Context:
    def __init__(self, n_threads, n_threads_batch):
        self.counts = [(n_threads, n_threads_batch)]

    def set_n_threads(self, n_threads, n_threads_batch):
        self.counts.append((n_threads, n_threads_batch))


class _Params:
    n_threads = 0
    n_threads_batch = 0


class Llama:
    def __init__(self, n_threads=None, n_threads_batch=None):
        self.n_threads = n_threads or max(multiprocessing.cpu_count() // 2, 1)
        self.n_threads_batch = n_threads_batch or multiprocessing.cpu_count()
        self.context_params = _Params()
        self._ctx = _Context(self.n_threads, self.n_threads_batch)
        self.evaluated = 0  # tokens evaluated, in this process and the one it was forked from

    def eval(self, tokens):
        self.evaluated += len(tokens)

    def threads_now(self):
        """What llama.cpp would use for the next batch and the next token."""
        return self._ctx.counts[-1]
