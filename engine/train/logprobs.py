"""Token log-probabilities of given sequences under a model: the one helper behind every
training loss and evaluation that reads them (pretraining and SFT, `parley eval`, DPO, PPO,
RLOO and GRPO)."""
import torch
import torch.nn.functional as F


def token_logprobs(model, ids: torch.Tensor, pad_mask: torch.Tensor | None, targets: torch.Tensor,
                   temperature: float = 1.0, entropy: bool = False):
    """log p(token t + 1 | tokens <= t) at every position t of right-padded `ids` [B, T], zero
    outside `targets` [B, T-1]; logits are divided by `temperature`, as in the rollout that drew
    the tokens. With `entropy`, also the entropy of each next-token distribution."""
    logits = model(ids[:, :-1], pad_mask=None if pad_mask is None else pad_mask[:, :-1]).float()
    if temperature != 1.0:   # dividing by 1 changes nothing and would cost a pass over the logits
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, 2, ids[:, 1:, None])[..., 0] * targets
    if not entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def split_loss(model, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token cross-entropy of `ids` [B, T] summed over the `targets` positions [B, T-1],
    and summed over the other positions: SFT's loss and GPT-1's auxiliary language-model loss,
    from one forward pass."""
    nll = -token_logprobs(model, ids, None, torch.ones(targets.shape, device=ids.device))
    targets = targets.to(nll.dtype)
    return (nll * targets).sum(), (nll * (1 - targets)).sum()


def summed_loss(model, ids: torch.Tensor, targets: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The next-token cross-entropy summed over the `targets` positions [B, T-1] of `ids` [B, T]."""
    return -token_logprobs(model, ids, pad_mask, targets.to(torch.float32)).sum()
