"""The text sides RECLF and PLACE take from GLoRIA and MGCA, checked against those codes' rules written out here as
plain loops over the word-piece strings of one report (gloria/models/text_model.py:BertEncoder.aggregate_tokens and
forward, gloria_model.py:_calc_local_loss and get_local_similarities, gloria/datasets/pretraining_dataset.py;
mgca/models/backbones/encoder.py:BertEncoder.aggregate_tokens and forward, mgca/datasets/pretrain_dataset.py), on a
small batch with a split word, an [UNK] and a report that fills every token."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import data
import place
import reclf

VOCAB = list(data._SPECIAL_TOKENS) + ["no", "pleural", "eff", "##usion", "left", "lung", ".", "is", "small"]
MAX_LENGTH = 12
# cleaned: "no pleural effusion left"; "no <unknown> effusion left lung" ([UNK]); the third fills all 12 tokens and
# is cut inside its second sentence, MGCA's reading stopping inside the split "eff ##usion" at tokens 9-10
REPORTS = [["No pleural effusion, left."], ["No xyz effusion left lung."],
           ["Left no pleural effusion.", "Left no pleural effusion lung is small."]]


@pytest.fixture(scope="module")
def tokenizer():
    return data._bert_tokenizer(VOCAB)


def official_batch(tokenizer):
    """What GLoRIA's and MGCA's datasets feed their BERT: the cleaned sentences joined by spaces, truncated and
    padded to max_length."""
    texts = [" ".join(data.clean_report(r)) for r in REPORTS]
    return tokenizer(texts, truncation=True, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt")


def test_clean_report_and_the_mid_sentence_cut_match_the_official_pipeline(tokenizer):
    assert data.clean_report(["FINDINGS: 1. Heart size is normal.", "No effusion; 2.5 cm nodule (right).", "Ok.",
                              "Café über ___ ."]) == ["heart size is normal", "no effusion", "5 cm nodule right",
                                                      "caf ber ___"]
    samples = [dict(image=torch.zeros(1, 4, 4), sentences=r, labels=torch.zeros(14), study_id=str(i))
               for i, r in enumerate(REPORTS)]
    ours = data.collate(samples, tokenizer, max_length=MAX_LENGTH, clean=True)
    official = official_batch(tokenizer)
    L = ours["input_ids"].shape[1]
    assert L == MAX_LENGTH  # the third report fills every token
    assert torch.equal(ours["input_ids"], official["input_ids"][:, :L])
    assert tokenizer.convert_ids_to_tokens(ours["input_ids"][2].tolist())[-3:] == ["eff", "##usion", "[SEP]"]
    whole = data.collate(samples, tokenizer, max_length=MAX_LENGTH)  # LoVT's rule: the second sentence dropped
    assert whole["attention_mask"][2].sum() < MAX_LENGTH


def aggregate(tokens, rows, weights=None):
    """Both codes' aggregate_tokens for one report: walk the pieces (zipped with the weights where given, which
    ends the walk at the shorter of the two), start a word at every piece without '##', flush it at the next
    word or at [SEP], then store [SEP] itself and stop. -> (slot rows, slot strings, slot weights)."""
    slots, names, attns = [], [], []
    bank, bank_names, bank_attn = [], [], []
    for t, (token, row) in enumerate(zip(tokens, rows)):
        if weights is not None and t >= len(weights):
            break
        a = 0.0 if weights is None else weights[t]
        if token == "[SEP]":
            slots.append(sum(bank)), names.append("".join(bank_names)), attns.append(sum(bank_attn))
            slots.append(row), names.append(token), attns.append(a)
            break
        if token.startswith("##"):
            bank.append(row), bank_names.append(token[2:]), bank_attn.append(a)
        else:
            if bank:
                slots.append(sum(bank)), names.append("".join(bank_names)), attns.append(sum(bank_attn))
            bank, bank_names, bank_attn = [row], [token], [a]
    return slots, names, attns


def reclf_model(tokenizer, *flags):
    args = common.parse_args(reclf.Args, reclf.PRESETS, ["--preset", "demo", "--max-length", str(MAX_LENGTH),
                                                         *flags])
    torch.manual_seed(0)
    return reclf.RECLF(args, tokenizer).eval()


def test_reclf_gloria_text_side_equals_gloria(tokenizer):
    """--text-pool gloria --word-columns gloria: GLoRIA's report vector (per layer the mean over the word_num slots,
    summed over the last layers) and its local-loss columns ([CLS] first; an [UNK] pushes the last word out)."""
    model = reclf_model(tokenizer, "--text-pool", "gloria", "--word-columns", "gloria")
    batch = official_batch(tokenizer)
    with torch.no_grad():
        words, mask, report = model.text_features(batch)
        layers = model.text_encoder.bert(**batch, output_hidden_states=True).hidden_states[-model.args.text_layers:]
    layers = torch.stack(layers, 1)  # B x k x L x D
    for b, ids in enumerate(batch["input_ids"]):
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
        slots, names, _ = aggregate(tokens, layers[b].transpose(0, 1))  # each slot k x D
        merged = torch.cat([torch.stack(slots), layers.new_zeros(MAX_LENGTH - len(slots), *slots[0].shape)])
        torch.testing.assert_close(report[b], merged.mean(0).sum(0))
        columns = len([n for n in names if not n.startswith("[")]) + 1
        assert mask[b].sum() == columns and not mask[b, columns:].any()
        torch.testing.assert_close(words[b, :columns], merged[:columns].sum(1))
    names = aggregate(tokenizer.convert_ids_to_tokens(batch["input_ids"][1].tolist()), range(MAX_LENGTH))[1]
    assert names == ["[CLS]", "no", "[UNK]", "effusion", "left", "lung", "[SEP]"]
    assert mask[1].sum() == 5  # [CLS] no [UNK] effusion left: "lung" is out


def test_reclf_gloria_zero_shot_local_equals_get_local_similarities(tokenizer):
    model = reclf_model(tokenizer, "--word-columns", "gloria")
    texts = ["pleural effusion", "no pleural effusion", "left lung is small no effusion"]
    prompts = data.prompt_batch(texts, tokenizer)
    regions = torch.randn(3, 6, model.text_encoder.out_dim)
    with torch.no_grad():
        ours = reclf.gloria_zero_shot_local(model, regions, prompts, texts)
        states = model.text_encoder(prompts["input_ids"], prompts["attention_mask"], sum_last=model.args.text_layers)
    for j, text in enumerate(texts):
        slots = aggregate(tokenizer.convert_ids_to_tokens(prompts["input_ids"][j].tolist()), states[j])[0]
        slots = torch.cat([torch.stack(slots), states.new_zeros(MAX_LENGTH - len(slots), states.shape[-1])])
        n = len([c for c in text if not c.startswith("[")])  # process_text counts the string's characters
        word = slots[1:n + 1]  # W x D
        for i in range(len(regions)):
            attn = (regions[i] @ word.T).softmax(-1).T  # per region a softmax over the words, then W x R
            attn = (4.0 * attn).softmax(-1)
            context = attn @ regions[i]
            cos = (word * context).sum(-1) / (word.norm(dim=-1) * context.norm(dim=-1)).clamp(min=1e-8)
            want = math.log((5.0 * cos).exp().max())
            assert ours[i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def place_model(tokenizer, *flags):
    args = common.parse_args(place.Args, place.PRESETS, [
        "--preset", "demo", "--max-length", str(MAX_LENGTH), "--image-size", "32", "--text-width", "32",
        "--head-hidden", "16", "--emb-dim", "8", "--decoder-heads", "2", "--decoder-ffn", "16", "--cce-dim", "8",
        "--num-queries", "2", *flags])
    torch.manual_seed(0)
    return place.PLACE(args, tokenizer).eval()


def eager_copy(bert):
    """The same BERT with transformers' eager attention, which returns the attention maps."""
    from transformers import BertConfig, BertModel
    config = {k: v for k, v in bert.config.to_dict().items() if not k.startswith("_")}
    eager = BertModel(BertConfig(**config, attn_implementation="eager"), add_pooling_layer=False)
    eager.load_state_dict(bert.state_dict())
    return eager.train(bert.training)


def test_place_mgca_text_equals_mgca(tokenizer):
    """--mgca-text: the words after [CLS] ([UNK] and [SEP] words) padded to max_length - 1 slots, the mask
    "not [PAD]", each word weighted by [CLS]'s attention to the token right of each piece, and a report filling
    every token losing its last word and [SEP]."""
    model = place_model(tokenizer, "--mgca-text", "--text-pool", "cls")
    batch = official_batch(tokenizer)
    with torch.no_grad():
        report, words, mask, weights = model.text_features(batch)
        out = eager_copy(model.text_encoder.bert)(**batch, output_attentions=True)
    cls_rows = out.attentions[-1][:, :, 0, 1:].mean(1)  # B x (L - 1), as MGCA's last_layer_attn
    assert words.shape[1] == MAX_LENGTH - 1
    for b, ids in enumerate(batch["input_ids"]):
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
        slots, names, attns = aggregate(tokens, out.last_hidden_state[b], cls_rows[b].tolist())
        pad = MAX_LENGTH - len(slots)
        names = names + ["[PAD]"] * pad
        want_words = torch.cat([torch.stack(slots), words.new_zeros(pad, words.shape[-1])])[1:]
        torch.testing.assert_close(words[b], want_words)
        torch.testing.assert_close(weights[b], torch.tensor(attns + [0.0] * pad)[1:])
        assert mask[b].tolist() == [n != "[PAD]" for n in names[1:]]
        torch.testing.assert_close(report[b], slots[0])
    assert aggregate(tokenizer.convert_ids_to_tokens(batch["input_ids"][2].tolist()), range(MAX_LENGTH),
                     [0.0] * (MAX_LENGTH - 1))[1][-1] == "pleural"  # "effusion" and [SEP] are gone
    assert mask[1].sum() == 6 and weights[1, 5] == 0  # no [UNK] effusion left lung [SEP]; [SEP]'s weight 0
    assert model.slot_maps({**batch, "images": torch.zeros(3, 1, 32, 32)}, tokenizer)[3][1] == [
        "no", "[UNK]", "effusion", "left", "lung", "[SEP]"]


def test_word_weights_are_the_attention_before_dropout(tokenizer):
    """MGCA's med.py returns the probabilities before its dropout; transformers' eager attention after it, so in
    training mode its rows no longer sum to 1. common.last_layer_cls_attention equals eager's in eval mode and
    stays a distribution in training mode."""
    bert = common.TextEncoder("tiny", tokenizer).bert.eval()
    batch = official_batch(tokenizer)
    mask = batch["attention_mask"]
    ref = eager_copy(bert)(**batch, output_attentions=True).attentions[-1][:, :, 0].mean(1)
    ours = common.last_layer_cls_attention(bert, bert(**batch, output_hidden_states=True).hidden_states[-2], mask)
    torch.testing.assert_close(ours, ref)
    assert (ours[mask == 0] == 0).all()
    bert.train()
    torch.manual_seed(0)
    dropped = eager_copy(bert)(**batch, output_attentions=True).attentions[-1][:, :, 0].mean(1)
    assert not torch.allclose(dropped.sum(-1), torch.ones(3))
    hidden = bert(**batch, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(common.last_layer_cls_attention(bert, hidden, mask).sum(-1), torch.ones(3))


def test_merged_word_index_reads_only_the_visited_tokens(tokenizer):
    ids = official_batch(tokenizer)["input_ids"]
    continues = common.word_tables(tokenizer)[1]
    full = common.merged_word_index(ids, continues, tokenizer.sep_token_id)
    cut = common.merged_word_index(ids, continues, tokenizer.sep_token_id, visited=MAX_LENGTH - 1)
    assert torch.equal(full[:2], cut[:2])  # reports with room for their [SEP] are read whole
    assert full[2].tolist() == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 9]
    assert cut[2].tolist() == [0, 1, 2, 3, 4, 4, 5, 6, 7, -1, -1, -1]


def test_text_encoder_keeps_the_first_layers_of_a_pretrained_model(tmp_path, tokenizer):
    """MGCA's text encoder is Bio_ClinicalBERT's first 6 layers (its bert_config.json, num_hidden_layers 6)."""
    full = common.TextEncoder("tiny", tokenizer, num_layers=4)
    full.save_pretrained(str(tmp_path))
    kept = common.TextEncoder(str(tmp_path), num_layers=2)
    assert len(kept.bert.encoder.layer) == 2
    torch.testing.assert_close(kept.bert.encoder.layer[1].output.dense.weight,
                               full.bert.encoder.layer[1].output.dense.weight)
    assert len(common.TextEncoder(str(tmp_path)).bert.encoder.layer) == 4


def test_the_paper_presets_use_the_official_text_sides():
    r = common.parse_args(reclf.Args, reclf.PRESETS, ["--data", "mimic", "--data-root", "x"])
    assert (r.text_pool, r.word_columns, r.clean_text, r.max_length, r.upsample) == ("gloria", "gloria", True, 97, 299)
    p = common.parse_args(place.Args, place.PRESETS, ["--data", "mimic", "--data-root", "x"])
    assert (p.mgca_text, p.clean_text, p.max_length, p.bert_layers, p.text_pool) == (True, True, 112, 6, "cls")
