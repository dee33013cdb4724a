"""Attention Edit Plan's token view: ``nti_core.plan_view`` (the marks, read off the engine's
maps; the warnings, the node's own messages) and its route ``POST /nti_photo_edit/plan_view``.

The first part needs only the SD1 vocabulary (clip-anytorch), as CI has it: the engine and the
route's request handling (``respond``). The last part runs the route in a real ComfyUI server
(the session's ``comfy_server``, skipped without $COMFYUI_PATH), including a plan refused by the
node's own validation when queued, with the message the view shows.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import http_support
import pytest

from nti_core import alignment as al
from nti_core import plan_spec
from nti_core import tokenizer as tk
from nti_core.family import FAMILIES, Family
from nti_core.plan_view import MAX_BODY, plan_view, respond

SOURCE = "a cat sitting next to a mirror"
TIGER = "a tiger sitting next to a mirror"
TALL = "a cat sitting next to a tall mirror"
ROUTE = "/nti_photo_edit/plan_view"


def node_message(fields: dict[str, Any], tok: tk.TokenizerSpec) -> str | None:
    """What the node's validation shows for these fields (nodes/edit_plan.checked_plan: the
    spec from the fields, then its words with the family's tokenizer), None when it passes."""
    try:
        plan_spec.check_words(plan_spec.plan_from_fields(fields), tok)
    except ValueError as e:
        return str(e)
    return None


def view(tok: tk.TokenizerSpec, **fields: Any) -> dict[str, Any]:
    answer = plan_view(fields, tok).to_json()
    json.dumps(answer, allow_nan=False)  # what the route sends must be strict JSON
    return answer


def prompt(answer: dict[str, Any], role: str, index: int = 0) -> dict[str, Any]:
    (found,) = [p for p in answer["prompts"] if p["role"] == role and p["index"] == index]
    return found


def marks(answer: dict[str, Any], index: int = 0) -> list[tuple[str, str | None, list[int]]]:
    return [(t["text"], t["mark"], t["from"]) for t in prompt(answer, "target", index)["tokens"]]


# --------------------------------------------------------------------------- the marks


def test_replace_marks_come_from_the_replace_mapper(tok: tk.TokenizerSpec) -> None:
    answer = view(tok, source_prompt=SOURCE, target_prompts=TIGER)
    assert answer["edit_kind"] == "replace" and answer["max_length"] == 77
    assert answer["warnings"] == []
    assert [(t["text"], t["mark"], t["pos"]) for t in prompt(answer, "source")["tokens"]] == [
        (w, "source", p) for p, w in enumerate(SOURCE.split(), start=1)]
    assert marks(answer) == [("a", "kept", [1]), ("tiger", "replaced", [2]),
                             ("sitting", "kept", [3]), ("next", "kept", [4]), ("to", "kept", [5]),
                             ("a", "kept", [6]), ("mirror", "kept", [7])]
    assert prompt(answer, "target")["n_tokens"] == 9  # with BOS and EOS
    m = al.replace_mapper(tok, SOURCE, TIGER)
    for t in prompt(answer, "target")["tokens"]:
        assert m[t["from"], t["pos"]].sum() == 1  # the target token's whole column


def test_refine_marks_come_from_the_alignment(tok: tk.TokenizerSpec) -> None:
    answer = view(tok, source_prompt=SOURCE, target_prompts=TALL)
    assert answer["edit_kind"] == "refine"
    assert marks(answer) == [("a", "kept", [1]), ("cat", "kept", [2]), ("sitting", "kept", [3]),
                             ("next", "kept", [4]), ("to", "kept", [5]), ("a", "kept", [6]),
                             ("tall", "added", []), ("mirror", "kept", [7])]
    mapper, alphas = al.refine_alignment(tok, SOURCE, TALL)
    for t in prompt(answer, "target")["tokens"]:
        assert (alphas[t["pos"]] == 0) == (t["mark"] == "added")
        assert t["from"] in ([], [int(mapper[t["pos"]])])


def test_reweight_alone_keeps_every_token_and_shows_the_factors(tok: tk.TokenizerSpec) -> None:
    answer = view(tok, source_prompt=SOURCE, target_prompts=SOURCE, reweight="mirror:0.5, cat:3")
    assert answer["edit_kind"] == "reweight" and answer["warnings"] == []
    tokens = prompt(answer, "target")["tokens"]
    assert [(t["mark"], t["from"]) for t in tokens] == [("kept", [t["pos"]]) for t in tokens]
    eq = al.equalizer(tok, SOURCE, "mirror:0.5, cat:3")
    assert [t["reweight"] for t in tokens] == [None, 3.0, None, None, None, None, 0.5]
    assert all(eq[t["pos"]] == (t["reweight"] or 1.0) for t in tokens)
    assert all(t["reweight"] is None for t in prompt(answer, "source")["tokens"])


def test_a_word_of_several_tokens(tok: tk.TokenizerSpec) -> None:
    target = "a ragamuffin sitting next to a mirror"
    answer = view(tok, source_prompt=SOURCE, target_prompts=target, reweight="ragamuffin:2",
                  blend_words="cat ragamuffin")
    tokens = prompt(answer, "target")["tokens"]
    rag = [t for t in tokens if t["word"] == "ragamuffin"]
    assert [t["pos"] for t in rag] == [2, 3, 4, 5] and {t["word_index"] for t in rag} == {1}
    assert "".join(t["text"] for t in rag) == "ragamuffin"
    # replace: one source token spread over four, ¼ each — replaced, not kept
    assert all(t["mark"] == "replaced" and t["from"] == [2] for t in rag)
    assert all(t["reweight"] == 2.0 and t["blend"] for t in rag)
    assert [t["pos"] for t in tokens if t["blend"]] == [2, 3, 4, 5]
    assert [t["pos"] for t in prompt(answer, "source")["tokens"] if t["blend"]] == [2]
    assert tokens[5]["text"] == "sitting" and tokens[5]["from"] == [3]  # after the four
    refined = view(tok, source_prompt=SOURCE, target_prompts="a ragamuffin cat sitting next to "
                   "a mirror")
    assert refined["edit_kind"] == "refine"
    assert [t["mark"] for t in prompt(refined, "target")["tokens"][1:5]] == ["added"] * 4


def test_punctuation_is_a_token_of_its_word(tok: tk.TokenizerSpec) -> None:
    target = "a tiger sitting next to a mirror."
    answer = view(tok, source_prompt=SOURCE, target_prompts=target, reweight="mirror:2",
                  blend_words="mirror")
    assert answer["edit_kind"] == "replace"  # 7 words each
    *_, mirror, dot = prompt(answer, "target")["tokens"]
    assert (mirror["text"], mirror["word"], mirror["pos"]) == ("mirror", "mirror", 7)
    assert (dot["text"], dot["word"], dot["pos"]) == (".", "mirror", 8)
    # "mirror" (1 token) → "mirror." (2 tokens): each takes half of the source's mirror
    assert mirror["mark"] == dot["mark"] == "replaced" and mirror["from"] == dot["from"] == [7]
    assert (mirror["reweight"], dot["reweight"]) == (2.0, None)  # the word's core only
    assert (mirror["blend"], dot["blend"]) == (True, False)
    alone = view(tok, source_prompt="a cat , sitting", target_prompts="a dog , sitting")
    comma = prompt(alone, "target")["tokens"][2]
    assert (comma["text"], comma["word"], comma["mark"]) == (",", "", "kept")


# --------------------------------------------------------------------------- the warnings


NODE_CASES = [  # one problem each: the view shows exactly the node's message, on this field
    ({"edit_kind": "replace", "target_prompts": "a big dog sitting next to a mirror"},
     "edit_kind"),
    ({"blend_words": "cat horse"}, "blend_words"),
    ({"reweight": "zebra:2"}, "reweight"),
    ({"reweight": "zebra:2", "target_prompts": TIGER + "\n" + TALL}, "reweight"),
    ({"reweight": "dog=2"}, "reweight"),
    ({"reweight": "dog:lots"}, "reweight"),
    ({"cross_words": "tiger:1.5"}, "cross_words"),
    ({"cross_words": "zebra:0.5"}, "cross_words"),
    ({"cross_start": 0.9, "cross_end": 0.5}, "cross_start"),
    ({"self_end": 1.5}, "self_end"),
    ({"blend_threshold": -0.1}, "blend_threshold"),
    ({"subtract_words": "mirror"}, "subtract_words"),
    ({"blend_words": "cat", "subtract_words": "pony"}, "subtract_words"),
    ({"source_prompt": "  "}, "source_prompt"),
    ({"target_prompts": "\n \n"}, "target_prompts"),
    ({"target_prompts": "a cat " * 40}, "target_prompts"),
    ({"source_prompt": "a cat " * 40}, "source_prompt"),
    ({"edit_kind": "sideways"}, "edit_kind"),
    ({"self_limit": "64x64"}, "self_limit"),
    ({"uncond_self_end": 1.5}, "uncond_self_end"),
]


@pytest.mark.parametrize(("change", "field"), NODE_CASES)
def test_each_problem_shows_the_nodes_message(tok: tk.TokenizerSpec, change: dict[str, Any],
                                              field: str) -> None:
    fields = {"source_prompt": SOURCE, "target_prompts": TIGER, **change}
    expected = node_message(fields, tok)
    assert expected is not None
    assert view(tok, **fields)["warnings"] == [{"field": field, "message": expected}]


def test_a_good_plan_has_no_warning(tok: tk.TokenizerSpec) -> None:
    fields = {"source_prompt": SOURCE, "target_prompts": TIGER + "\n" + TALL,
              "cross_words": "tiger:0.5", "reweight": "tiger:2", "blend_words": "cat tiger",
              "subtract_words": "mirror", "edit_kind": "refine"}
    assert node_message(fields, tok) is None
    assert view(tok, **fields)["warnings"] == []


def test_every_problem_is_listed_with_the_message_it_has_alone(tok: tk.TokenizerSpec) -> None:
    """Where the node shows the first problem, the view lists each, as the node would show it
    with that problem alone."""
    base = {"source_prompt": SOURCE, "target_prompts": TIGER}
    problems = {"reweight": "tiger:2, zebra:2", "blend_words": "cat horse",
                "subtract_words": "mirror pony", "cross_words": "tiger:0.5, gnu:0.3"}
    answer = view(tok, **base, **problems)
    alone = {
        "cross_words": node_message({**base, "cross_words": "gnu:0.3"}, tok),
        "reweight": node_message({**base, "reweight": "zebra:2"}, tok),
        "blend_words": node_message({**base, "blend_words": "horse"}, tok),
        "subtract_words": node_message({**base, "blend_words": "cat",
                                        "subtract_words": "pony"}, tok),
    }
    assert answer["warnings"] == [{"field": f, "message": m} for f, m in alone.items()]
    assert node_message({**base, **problems}, tok) in alone.values()  # the node's first
    target = prompt(answer, "target")["tokens"]
    assert [t["word"] for t in target if t["reweight"]] == ["tiger"]  # the found words still act
    assert [t["word"] for t in prompt(answer, "source")["tokens"] if t["blend"]] == ["cat"]
    assert [t["word"] for t in target if t["subtract"]] == ["mirror"]
    fields_broken = view(tok, **base, reweight="tiger=2", cross_start=0.9, cross_end=0.5,
                         edit_kind="sideways")
    assert [w["field"] for w in fields_broken["warnings"]] == ["edit_kind", "cross_start",
                                                               "reweight"]


def test_replace_with_other_word_counts_leaves_that_target_unaligned(
        tok: tk.TokenizerSpec) -> None:
    big = "a big dog sitting next to a mirror"
    answer = view(tok, source_prompt=SOURCE, target_prompts=f"{big}\n{TIGER}\n{big}",
                  edit_kind="replace", reweight="tiger:2")
    assert answer["edit_kind"] == "replace"
    message = node_message({"source_prompt": SOURCE, "target_prompts": big,
                            "edit_kind": "replace"}, tok)
    assert answer["warnings"] == [{"field": "edit_kind", "message": message}]  # once
    assert {t["mark"] for t in prompt(answer, "target", 0)["tokens"]} == {None}
    assert marks(answer, 1)[1] == ("tiger", "replaced", [2])
    assert prompt(answer, "target", 1)["tokens"][1]["reweight"] == 2.0


def test_a_prompt_over_the_limit_keeps_the_tokens_that_fit(tok: tk.TokenizerSpec) -> None:
    long = " ".join(["cat"] * 80)
    fields = {"source_prompt": SOURCE, "target_prompts": f"{TIGER}\n{long}"}
    answer = view(tok, **fields)
    assert answer["edit_kind"] is None
    assert answer["warnings"] == [{"field": "target_prompts",
                                   "message": node_message(fields, tok)}]
    over = prompt(answer, "target", 1)
    assert over["n_tokens"] == 82 and over["text"] == long
    assert len(over["tokens"]) == 75  # 75 + BOS + EOS = 77
    assert [t["pos"] for t in over["tokens"]] == list(range(1, 76))
    assert {t["mark"] for t in over["tokens"]} == {None}
    assert [t["text"] for t in prompt(answer, "target", 0)["tokens"]] == TIGER.split()


def test_a_blank_prompt_still_draws_the_others(tok: tk.TokenizerSpec) -> None:
    answer = view(tok, source_prompt=" ", target_prompts=TIGER)
    message = node_message({"source_prompt": " ", "target_prompts": TIGER}, tok)
    assert answer["warnings"] == [{"field": "source_prompt", "message": message}]
    assert [(p["role"], p["index"]) for p in answer["prompts"]] == [("target", 0)]
    assert answer["edit_kind"] is None


def test_a_nan_factor_is_not_sent_as_nan(tok: tk.TokenizerSpec) -> None:
    answer = view(tok, source_prompt=SOURCE, target_prompts=TIGER, reweight="tiger:nan")
    assert prompt(answer, "target")["tokens"][1]["reweight"] is None


# --------------------------------------------------------------------------- the request


@pytest.fixture(scope="module")
def tokenizer_of(tmp_path_factory: pytest.TempPathFactory):
    """Family → its tokenizer (``Family.tokenizer`` from clip-anytorch's vocabulary), with the
    families it was asked for."""
    if tk.clip_anytorch_bpe() is None:
        pytest.skip(f"no SD1 vocabulary ({tk.INSTALL_HINT})")
    folder = tmp_path_factory.mktemp("plan_view_vocab")
    tk.write_vocab_merges(folder, *tk.bpe_to_vocab_merges(tk.clip_anytorch_bpe()))

    def of(family: Family) -> tk.TokenizerSpec:
        of.asked.append(family.key)
        return tk.family_tokenizer(family.tokenizer, folder)

    of.asked = []
    return of


def request(**body: Any) -> bytes:
    return json.dumps(body).encode()


def test_each_family_tokenises_with_its_own_tokenizer(tokenizer_of) -> None:
    fields = {"source_prompt": SOURCE, "target_prompts": TIGER, "reweight": "tiger:2"}
    answers = {}
    for key in FAMILIES:
        tokenizer_of.asked.clear()
        status, answers[key] = respond(request(fields=fields, family=key), tokenizer_of)
        assert status == 200 and tokenizer_of.asked == [key]
    assert set(FAMILIES) == {"sd1", "sd2", "sdxl"}
    # every family here reads CLIP's BPE vocabulary: the same tokens, the same marks
    assert answers["sd1"] == answers["sd2"] == answers["sdxl"]
    tokenizer_of.asked.clear()
    assert respond(request(fields=fields), tokenizer_of) == (200, answers["sd1"])
    assert tokenizer_of.asked == ["sd1"]  # the default


BAD_REQUESTS = [
    (b"{not json", "expected a JSON body"),
    (b"\xff\xfe", "expected a JSON body"),
    (b"[" * 100_000 + b"]" * 100_000, "must be at most 65536 bytes"),
    (b"[" * 30_000 + b"]" * 30_000, "expected a JSON body"),  # nested past the parser's depth
    (b"[1, 2]", "expected a JSON object"),
    (request(family="sd1"), 'expected "fields": an object of Attention Edit Plan field values, '
     "got no fields"),
    (request(fields=["source_prompt"]), '"fields": an object of Attention Edit Plan field '
     "values, got an array"),
    (request(fields={}, model="x"), "got also ['model']"),
    (request(fields={"prompt": "a cat"}), "unknown edit-plan fields ['prompt']"),
    (request(fields={"source_prompt": 3}), "field 'source_prompt' must be a string, got a number"),
    (request(fields={"target_prompts": None}), "must be a string, got null"),
    (request(fields={"cross_end": "0.8"}), "field 'cross_end' must be a number, got a string"),
    (request(fields={"cross_end": True}), "must be a number, got a boolean"),
    (request(fields={"reweight": {"cat": 2}}), "must be a string, got an object"),
    (request(fields={}, family="sd3"), "family must be one of ['sd1', 'sd2', 'sdxl'], got 'sd3'"),
    (request(fields={}, family=["sdxl"]), "family must be one of"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_REQUESTS)
def test_a_bad_request_gets_400_saying_what_was_expected(tokenizer_of, raw: bytes,
                                                         message: str) -> None:
    status, answer = respond(raw, tokenizer_of)
    assert status == 400 and set(answer) == {"error"}
    assert message in answer["error"]


def test_the_body_limit_is_at_the_limit(tokenizer_of) -> None:
    fits = request(fields={"cross_words": ""})
    fits = fits[:-2] + b" " * (MAX_BODY - len(fits)) + fits[-2:]
    assert len(fits) == MAX_BODY and respond(fits, tokenizer_of)[0] == 200
    assert respond(fits + b" ", tokenizer_of)[0] == 400


# --------------------------------------------------------------------------- in ComfyUI


def post_raw(server: http_support.ComfyServer, path: str, data: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def comfy_tok(comfy_server: http_support.ComfyServer) -> tk.TokenizerSpec:
    """The tokenizer the server's route uses: the vocabulary beside ComfyUI's comfy.sd1_clip."""
    return tk.family_tokenizer("clip-bpe", Path(comfy_server.comfy_root) / "comfy" / "sd1_tokenizer")


def test_route_answers_as_the_engine(comfy_server, comfy_tok) -> None:
    fields = {"source_prompt": SOURCE, "target_prompts": f"{TIGER}\n{TALL}",
              "reweight": "tiger:2, zebra:3", "blend_words": "cat tiger"}
    expected = plan_view(fields, comfy_tok).to_json()
    assert expected["warnings"] and expected["prompts"][1]["tokens"][1]["reweight"] == 2.0
    for path in (ROUTE, "/api" + ROUTE):  # the frontend's api.fetchApi adds /api
        for family in ("sd1", "sdxl"):
            reply = comfy_server.post(path, {"fields": fields, "family": family})
            assert reply.status == 200, reply.body
            assert reply.body == expected


@pytest.mark.parametrize(("raw", "message"), [
    (request(fields="a cat"), "got a string"),
    (request(fields={"source_prompt": SOURCE}, family="flux"), "family must be one of"),
    (b"x" * 200_000, "must be at most 65536 bytes"),
    (b"", "expected a JSON body"),
])
def test_route_refuses_a_bad_request_with_400(comfy_server, raw: bytes, message: str) -> None:
    status, answer = post_raw(comfy_server, ROUTE, raw)
    assert status == 400 and message in answer["error"]
    assert "Traceback" not in comfy_server.log_text()


def test_route_shows_what_queueing_refuses(comfy_server, comfy_tok) -> None:
    """A plan the node's validation refuses on /prompt: the view's warning is that message."""
    from test_workflows_http import load_ui
    from workflow_api import find_nodes, ui_to_api

    info = comfy_server.get("/object_info", timeout=60).body
    api = ui_to_api(load_ui("nti_p2p_real_image_edit"), info)
    (plan,) = find_nodes(api, "NTIAttentionEditPlan")
    fields = {"source_prompt": api[plan]["inputs"]["source_prompt"], "target_prompts": TIGER,
              "edit_kind": "replace", "reweight": "zebra:2", "blend_words": "", "subtract_words": ""}
    api[plan]["inputs"].update(fields)
    refused = comfy_server.queue(api)
    assert refused.status == 400
    shown = comfy_server.post(ROUTE, {"fields": fields}).body["warnings"]
    assert [w["field"] for w in shown] == ["reweight"]
    assert shown[0]["message"] in http_support.node_error_text(refused.body)
