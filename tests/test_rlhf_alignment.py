"""What RLHF's numbers are read from: which tokens are the reply, where the reward and the values
sit, what a rollout's log-probabilities line up with, how long a context is, and how gradients
are clipped. Tiny random models; each test takes a second or so."""
import copy

import pytest
import torch

import engine
from engine.generate import Generation
from engine.rlhf.dpo import sequence_logprobs
from engine.rlhf.ppo import values_of
from engine.rlhf.prefs import encode_pairs, fit_prompt, reply_batch, reply_ids
from engine.rlhf.reward_model import RewardLM, RewardModel
from engine.rlhf.rollout import Sampling, prompt_window, rollout, scores
from engine.train.config import PPOConfig
from engine.train.logprobs import token_logprobs
from engine.train.run import Run
from helpers import make_checkpoint

MULTI_TURN = [{"role": "user", "content": "Hello there! How are you doing today?"},
              {"role": "assistant", "content": "I am fine, thank you. What is your favourite book?"},
              {"role": "user", "content": "I like reading stories about the sea."}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("align") / "llama"
    make_checkpoint(path, "llama_gqa_untied")
    return engine.load(path, device="cpu", dtype="float32")


def reward_lm(lm, offset=0.7, scale=2.5, max_len=256):
    torch.manual_seed(1)
    model = RewardModel(copy.deepcopy(lm.model), offset, scale)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    return RewardLM(model.eval(), lm.tokenizer, {**lm.config, "parley_max_length": max_len})


def test_a_reply_is_its_own_tokens_and_never_an_earlier_turn(lm):
    tok = lm.tokenizer
    prompt, reply = reply_ids(tok, MULTI_TURN, "The sea is nice.")
    assert prompt == tok.encode_chat(MULTI_TURN)   # exactly what a policy is prompted with
    assert tok.decode(reply, skip_special_tokens=False) == "The sea is nice.<|im_end|>\n"
    # the log-probability of the reply counts its tokens only, not the earlier assistant turn
    rows = [(prompt, reply)]
    by_hand = 0.0
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt + reply])).log_softmax(-1)[0]
        for t, token in enumerate(reply):
            by_hand += logits[len(prompt) + t - 1, token].item()
        assert sequence_logprobs(lm.model, rows, tok.pad_token_id).item() == pytest.approx(by_hand, abs=1e-4)


def test_chosen_and_rejected_see_the_same_prompt_window_and_long_replies_are_skipped(lm):
    tok = lm.tokenizer
    groups = [{"prompt": MULTI_TURN, "pairs": [("Yes.", "No, I do not think that the sea is nice at all today."),
                                               ("word " * 80, "Fine.")]}]
    encoded, skipped = encode_pairs(tok, groups, max_len=40)
    assert skipped == 1
    [(window, chosen, rejected)] = encoded[0]["pairs"]
    assert len(window) + max(len(chosen), len(rejected)) == 40
    assert window == tok.encode_chat(MULTI_TURN)[-len(window):]
    assert fit_prompt([1, 2, 3], [[4] * 5], 5) is None and fit_prompt([1, 2, 3], [[4] * 3], 5) == [2, 3]


def test_reply_batch_targets_are_the_reply_tokens(lm):
    ids, pad_mask, targets = reply_batch([([5, 6, 7], [8, 9]), ([5], [8, 9, 10])], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 0]]
    assert targets.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]   # position t predicts token t + 1
    assert pad_mask.tolist() == [[True] * 5, [True] * 4 + [False]]


def test_the_reward_is_read_at_each_rows_own_last_token(lm):
    rm = reward_lm(lm)
    rows = [rm.encode(MULTI_TURN, "The sea."), rm.encode([{"role": "user", "content": "hi"}], "Hello there! How are "
                                                                                                  "you doing today?")]
    assert len(rows[0]) != len(rows[1])
    with torch.no_grad():
        together = rm.model(*rm.batch(rows))
        alone = [rm.model(*rm.batch([r]))[0].item() for r in rows]
        raw = rm.model.score(rm.model.backbone.hidden_states(torch.tensor([rows[1]]))[:, -1]).item()
    assert together.tolist() == pytest.approx(alone, abs=1e-5)
    assert alone[1] == pytest.approx((raw - 0.7) / 2.5, abs=1e-5)     # normalised: (raw - offset) / scale


def test_the_critic_starts_on_the_scale_of_the_rewards(lm):
    rm = reward_lm(lm)
    critic = copy.deepcopy(rm.model)
    row = rm.encode(MULTI_TURN, "The sea is nice.")
    # the value at the last position of a row is the critic's reading of the whole row: the reward
    ids, pad_mask = torch.tensor([row + [0]]), torch.tensor([[True] * len(row) + [False]])
    targets = torch.zeros(1, len(row))
    targets[0, len(row) - 1] = 1.0
    with torch.no_grad():
        values = values_of(critic, ids, pad_mask, targets)
        reward = rm.model(*rm.batch([row]))[0].item()
    assert values[0, len(row) - 1].item() == pytest.approx(reward, abs=1e-5) and reward != 0.0
    assert values[0, :len(row) - 1].abs().sum().item() == 0.0


def test_rollout_log_probabilities_line_up_with_the_sampled_tokens(lm):
    prompts = [MULTI_TURN, [{"role": "user", "content": "hi"}]]
    sampling = Sampling(temperature=0.7, max_new_tokens=6)
    r = rollout(lm, prompts, 2, sampling, context=128, seed=11)
    with torch.no_grad():
        logp = token_logprobs(lm.model, r.ids, r.pad_mask, r.targets, sampling.temperature)
    for row in range(4):
        window = r.windows[row]
        gen = Generation(lm, window, [sampling.settings(11 + row)], top_alternatives=0)
        tokens = [e for e in gen if hasattr(e, "sampled_logprob")]
        assert r.ids[row, len(window):len(window) + len(tokens)].tolist() == [t.token_id for t in tokens]
        assert r.targets[row].sum().item() == len(tokens)
        # sampled at T with nothing cut: the draw's log-probabilities are the model's at T
        assert logp[row].sum().item() == pytest.approx(sum(t.sampled_logprob for t in tokens), abs=1e-3)


def test_one_context_length_from_the_policy_to_the_reward_model(lm):
    long_prompt = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 20}]
    rm = reward_lm(lm, max_len=48)
    sampling = Sampling(max_new_tokens=8)
    r = rollout(lm, [long_prompt], 2, sampling, rm.max_len, seed=3)
    end_of_turn = len(reply_ids(lm.tokenizer, long_prompt, "")[1])
    assert len(r.windows[0]) == 48 - 8 - end_of_turn
    assert r.windows[0] == prompt_window(lm.tokenizer, long_prompt, 48, 8)
    # the reward model reads the end of the window the policy saw and the reply as text, in its length
    expected = []
    for i in range(2):
        reply = reply_ids(lm.tokenizer, long_prompt, r.texts[i])[1]
        row = fit_prompt(r.windows[i], [reply], 48) + reply
        assert len(row) == 48 and row[:-len(reply)] == r.windows[i][-(48 - len(reply)):]
        expected.append(rm.model(*rm.batch([row]))[0].item())
    assert scores(rm, r).tolist() == pytest.approx(expected, abs=1e-5)
    penalised = scores(rm, r, missing_eos_penalty=1.0, clip=0.01)
    assert penalised.abs().max().item() <= 0.01


def test_actor_and_critic_gradients_are_clipped_apart(tmp_path):
    actor, critic = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([actor, critic], lr=1.0)
    run = Run(PPOConfig(policy="base", reward_model="rm", out=str(tmp_path), device="cpu"), "base")
    loss = (actor * torch.tensor([0.3, 0.4])).sum() + (critic * torch.tensor([6.0, 8.0])).sum()
    norms = run.update(optimizer, loss, [[actor], [critic]])
    assert norms == pytest.approx([0.5, 10.0])
    assert actor.tolist() == pytest.approx([-0.3, -0.4])        # norm 0.5 < 1: untouched
    assert critic.tolist() == pytest.approx([-0.6, -0.8])       # norm 10 clipped to 1
