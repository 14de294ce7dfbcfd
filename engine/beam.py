"""Beam search for one candidate, step by step, as transformers (v4.50+) does it.

Each step keeps the best K = max(2, 1 + number of EOS ids) x num_beams continuations of all
beams. Those that end (EOS, a stop string, the length limit) and rank among the first num_beams
become finished hypotheses, scored sum(log p) / length ** length_penalty; the best num_beams
unfinished ones run on. `early_stopping` decides when no running beam can still win.
"""
import torch

NEG = -1.0e9  # transformers' "impossible" score; the same constant keeps tie-breaking identical


class BeamSearch:
    def __init__(self, settings, eos_ids: list[int], tokenizer):
        self.s, self.eos_ids, self.tokenizer = settings, eos_ids, tokenizer
        self.n = settings.num_beams
        self.k = max(2, 1 + len(eos_ids)) * self.n
        self.steps = 0
        self.done = False
        self.running_scores = None                # [n], made on the device of the first scores
        self.running: list[list[int]] = [[] for _ in range(self.n)]
        self.finished: list[list[int]] = [[] for _ in range(self.n)]
        self.finished_scores = None               # [n]
        self.is_finished = None                   # [n] bool
        self.can_improve = True

    def step(self, logprobs: torch.Tensor, generated: torch.Tensor):
        """Advance by one token. logprobs [n, vocab] are processed log-probs of the running beams and
        generated [n, steps] their tokens so far. Returns (parent beam, new token) per running beam."""
        n, vocab = logprobs.shape
        device = logprobs.device
        if self.running_scores is None:
            self.running_scores = torch.full((n,), NEG, device=device)
            self.running_scores[0] = 0.0          # the beams start identical: only one may expand
            self.finished_scores = torch.full((n,), NEG, device=device)
            self.is_finished = torch.zeros(n, dtype=torch.bool, device=device)
        top_scores, top_index = (logprobs + self.running_scores[:, None]).reshape(-1).topk(self.k)
        beam_of, tokens = top_index // vocab, top_index % vocab
        candidates = torch.cat([generated[beam_of], tokens[:, None]], dim=1)
        ends = torch.isin(tokens, torch.tensor(self.eos_ids, device=device, dtype=torch.long))
        ends |= self.steps + 1 >= self.s.max_new_tokens
        if self.s.stop:
            ends |= torch.tensor([self._hits_stop(seq) for seq in candidates.tolist()], device=device)

        # The best n candidates that have not ended run on.
        running_scores = top_scores + ends.float() * NEG
        nxt = running_scores.topk(n).indices
        self.running_scores = running_scores[nxt]
        self.running = candidates[nxt].tolist()

        # Candidates among the first n that ended compete with the finished hypotheses.
        just_finished = ends & (torch.arange(self.k, device=device) < n)
        scores = top_scores / ((self.steps + 1) ** self.s.length_penalty)
        scores += float(bool(self.is_finished.all()) and self.s.early_stopping is True) * NEG
        scores += float(not self.can_improve) * NEG
        scores += (~just_finished).float() * NEG
        merged_scores = torch.cat([self.finished_scores, scores])
        best = merged_scores.topk(n).indices
        merged = self.finished + candidates.tolist()
        self.finished = [merged[i] for i in best.tolist()]
        self.finished_scores = merged_scores[best]
        self.is_finished = torch.cat([self.is_finished, just_finished])[best]
        self.steps += 1

        # Could a running beam still beat the worst finished one? (transformers' heuristic)
        if self.s.early_stopping == "never" and self.s.length_penalty > 0:
            best_length = self.s.max_new_tokens
        else:
            best_length = self.steps
        best_running = self.running_scores[0] / (best_length ** self.s.length_penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(), torch.tensor(NEG, device=device))
        self.can_improve = self.can_improve and bool((best_running > worst_finished).any())
        all_full = bool(self.is_finished.all()) and self.s.early_stopping is True
        self.done = not self.can_improve or all_full or bool(ends.all())
        return beam_of[nxt], tokens[nxt]

    def cancel(self) -> None:
        self.done, self.cancelled = True, True

    def results(self) -> list[dict]:
        """The returned sequences, best first: text, token_ids, score and finish_reason."""
        if getattr(self, "cancelled", False) and not bool(self.is_finished is not None and self.is_finished.any()):
            picks = [(ids, None) for ids in self.running[:self.s.num_return_sequences]]
        else:
            picks = [(ids, float(score)) for ids, score, ok in
                     zip(self.finished, self.finished_scores.tolist(), self.is_finished.tolist()) if ok]
            picks = picks[:self.s.num_return_sequences]
        out = []
        for ids, score in picks:
            text = self.tokenizer.decode(ids)
            hits = [i for i in (text.find(s) for s in self.s.stop) if i >= 0]
            reason = ("cancelled" if score is None else "eos" if ids and ids[-1] in self.eos_ids
                      else "stop" if hits else "length")
            out.append({"text": text[:min(hits)] if hits else text, "token_ids": ids, "score": score,
                        "finish_reason": reason})
        return out

    def _hits_stop(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids)
        return any(s in text for s in self.s.stop)
