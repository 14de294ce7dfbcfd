"""Tiny tokenizers and random checkpoints built on the fly: tests never download anything."""
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>", "<|begin_of_text|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|user|>", "<|assistant|>", "<|system|>"]

@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n for a while, then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


CORPUS = [
    "Hello there! How are you doing today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "What is your favourite book? I like reading stories about the sea.",
    "Let's talk about the weather: it is sunny and warm outside.",
    "Numbers like 12345 and 67890 appear too, with punctuation; quotes \"here\".",
] * 20

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# Written for these tests in the shape of Gemma's and Qwen3's templates: the features they rely on
# (a system message folded into the first turn, role renaming, raise_exception, namespace, negative
# slices, string methods, whitespace control) must render as transformers renders them.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message.role == 'user' and ns.last_query == -1 %}{%- set ns.last_query = index %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- if loop.index0 < ns.last_query and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)


def train_tokenizer(vocab_size: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def hf_tokenizer(template: str = CHATML, bos="<|begin_of_text|>", eos="<|im_end|>"):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), bos_token=bos, eos_token=eos,
                                   pad_token="<pad>", unk_token=None, chat_template=template)


CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "llama_gqa_untied": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "llama3_tied_scaled": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                               rope_theta=500000.0, max_position_embeddings=256,
                               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0, original_max_position_embeddings=16)),
    "llama_linear": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, rope_scaling=dict(type="linear", factor=2.0)),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
}


def make_checkpoint(path: Path, name: str, seed: int = 0, template: str = CHATML):
    """Save a random transformers model of config `name` with a tiny tokenizer; return the HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tok = hf_tokenizer(template)
    kwargs = dict(CONFIGS[name])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=tok.vocab_size, initializer_range=0.2,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # random, not zero, norms and biases, so that every tensor matters
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def make_reward_model(base: Path, out: Path, seed: int = 0, std: float = 10.0):
    """A reward model on the checkpoint at `base`: its backbone and a random head (wide spread, so
    no two replies score alike), saved as `parley train rm` saves one; returns the RewardLM."""
    import engine
    from engine.rlhf.reward_model import RewardLM, RewardModel
    lm = engine.load(base, device="cpu")
    torch.manual_seed(seed)
    model = RewardModel(lm.model)
    torch.nn.init.normal_(model.score.weight, std=std)
    rm = RewardLM(model.eval(), lm.tokenizer, {**lm.config, "parley_max_length": 128})
    rm.save(out)
    return rm


def make_bert(path: Path, tokenizer_dir: Path, seed: int = 0, positions: int = 64):
    """A tiny random BERT directory (as `parley train mlm` writes one) on the tokenizer at `tokenizer_dir`."""
    from engine.models import bert
    from engine.train.mlm import bert_tokenizer
    tok = bert_tokenizer(str(tokenizer_dir))
    torch.manual_seed(seed)
    model = bert.Bert(bert.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64,
                                      max_position_embeddings=positions)).eval()
    path.mkdir(parents=True, exist_ok=True)
    bert.write(model, tok, path)
    return path
