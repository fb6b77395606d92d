"""How the engine feeds tokens into a conversation's memory: the model's ordinary forward pass, or, where
the LoLA kernels run on Triton (a CUDA GPU), one ``CapturedDecoder`` that replays CUDA graphs of the
whole step (an order of magnitude faster per token than launching every operation from Python).

Either way the engine samples from the logits returned here, so both give the same reply (greedy
decoding may take the argmax the captured step computed from those logits, ``TokenFeeder.argmax``).
The captured decoder works on its own copies of the state tensors: ``sync`` writes them back into the
``State``, and a State that was replaced or restored is taken again (``bind``) before the next feed.
"""

from __future__ import annotations

import torch

from lola_chat.errors import LolaError
from lola_chat.kernels import lola
from lola_chat.memory import State

# "model": the model's forward; "captured": CUDA graph replay; "uncaptured": the captured step functions
# run directly, without graphs (tests on a CPU through Triton's interpreter); "auto": captured where
# ``captured_decoding_applies``, else the model.
DECODINGS = ("auto", "model", "captured", "uncaptured")


def captured_decoding_applies(model, state: State) -> bool:
    """Whether ``state`` is fed by graph replay: LoLA memory whose kernels dispatch to Triton (kernels/lola's
    rule: CUDA tensors, Triton importable, LOLA_CHAT_REFERENCE unset, suitable shapes). The captured step
    calls the Triton eviction, which runs ``lola.TRITON_POLICIES`` (and their joint forms) only."""
    if state.kind != "lola" or state.layers[0].settings.scoring not in lola.TRITON_POLICIES:
        return False
    memory, attn = state.layers[0], model.layers[0].self_attn
    with torch.no_grad():
        return lola.uses_triton(memory.win_k, memory.h, attn.fmap_q, feature_map=attn.fmap_q)


class TokenFeeder:
    """Feeds one conversation's token ids into its ``State`` and returns the logits after the last one.
    The decoder, when used, is created on the first feed and kept for every later State."""

    def __init__(self, model, decoding: str = "auto"):
        if decoding not in DECODINGS:
            raise LolaError(f"unknown decoding {decoding!r}; known: {', '.join(DECODINGS)}")
        self.model = model
        self.decoding = decoding
        self.state: State | None = None
        self.decoder = None
        self._bound = False
        # The decoder's token count after this feeder's last feed (None: nothing fed since ``bind``), and
        # the host copy of its argmax then, once read (``argmax``): valid while the decoder's count is
        # still ``_fed_at``, so a decoder stepped by anyone else never has a stale argmax fed back.
        self._fed_at: int | None = None
        self._argmax: int | None = None

    def bind(self, state: State | None) -> None:
        """Feed ``state`` from now on; also after it was restored in place (the decoder's copy is dropped)."""
        self.state = state
        self._bound = False
        self._fed_at = self._argmax = None

    def uses_decoder(self) -> bool:
        if self.decoding == "auto":
            self.decoding = "captured" if captured_decoding_applies(self.model, self.state) else "model"
        return self.decoding != "model"

    def _decoder(self):
        from lola_chat.graphs import CapturedDecoder

        if self.decoder is None:
            self.decoder = CapturedDecoder(self.model, self.state, capture=self.decoding == "captured")
        elif not self._bound:
            self.decoder.rebind(self.state)
        self._bound = True
        return self.decoder

    def prepare(self) -> None:
        """Make the decoder ready for the bound State now (captured on first use, else its memory reloaded),
        so that the next feed only feeds."""
        if self.uses_decoder():
            self._decoder()

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` (one sequence, at least one token); returns fp32 logits (vocab,) after the last. With
        the decoder the State lags until ``sync``; the logits are its buffer, valid until the next feed."""
        if not self.uses_decoder():
            tokens = torch.tensor([ids], device=self.model.embed_tokens.weight.device)
            return self.model(tokens, self.state, last_only=True)[0, -1]
        decoder = self._decoder()
        computed = self._argmax == ids[0] and self._fed_at == decoder.tokens_seen
        if len(ids) == 1:
            # A decoded token: one graph replay, without prefill's reply bookkeeping (the engine samples).
            # The argmax the decoder computed is already its input buffer: feeding that buffer costs no
            # copy from the host, which would wait for the copy before the replay launches.
            decoder.step(decoder.token if computed else ids[0])
        else:
            decoder.prefill(torch.tensor([ids], device=self.model.embed_tokens.weight.device))
        self._fed_at, self._argmax = decoder.tokens_seen, None
        return decoder.logits[0]

    def argmax(self) -> int | None:
        """The argmax of the logits the last feed returned, as the decoder's greedy step computed it (reading
        it waits for that step); None where the model's forward feeds, where nothing was fed since ``bind``,
        and where the decoder was stepped by anything but this feeder since its last feed."""
        decoder = self.decoder
        if decoder is None or not self._bound or self._fed_at != decoder.tokens_seen:
            return None
        if self._argmax is None:
            self._argmax = int(decoder.token[0])
        return self._argmax

    def sync(self) -> State:
        """Bring the State up to date with everything fed, and return it."""
        if self.decoder is not None and self._bound:
            self.decoder.sync()
        return self.state
