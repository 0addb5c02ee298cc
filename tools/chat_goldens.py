#!/usr/bin/env python3
"""Render every chat template x conversation the way transformers does.

Writes the goldens that t/unit/jinja.c compares the C interpreter against
(byte for byte).  Needs python3 with transformers (and jinja2); no network.

    python3 tools/chat_goldens.py --out t/data/chat/goldens.json

    python3 tools/chat_goldens.py --cases t/data/chat/cases.json

Inputs: t/data/chat/templates/<name>.jinja, t/data/chat/conversations.json.
Rendering uses transformers' own chat-template code (render_jinja_template,
else _compile_jinja_template(...).render(...)) with messages,
add_generation_prompt, tools=None, documents=None and the template's
bos_token/eos_token from TOKENS below (None: not passed, i.e. undefined).
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "t", "data", "chat")

# special tokens of each template's model (tokenizer_config.json)
TOKENS = {
    "llama-2-chat": ("<s>", "</s>"),
    "llama-3-instruct": ("<|begin_of_text|>", "<|end_of_text|>"),
    "llama-3.1-instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-7b-instruct": ("<s>", "</s>"),
    "mixtral-8x7b-instruct": ("<s>", "</s>"),
    "qwen2-instruct": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "zephyr": ("<s>", "</s>"),
}


def mimic_compile(template):
    """transformers' Jinja environment, rebuilt from jinja2 alone (used only
    when transformers is not installed; `method` in the output says so)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None,
               sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(template, messages, add_generation_prompt, bos, eos):
    kw = {}
    if bos is not None:
        kw["bos_token"] = bos
    if eos is not None:
        kw["eos_token"] = eos
    try:
        from transformers.utils import chat_template_utils as ctu
    except ImportError:
        return mimic_compile(template).render(
            messages=messages, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt,
            **kw), "jinja2-mimic (transformers not installed)"
    if hasattr(ctu, "render_jinja_template"):
        out, _ = ctu.render_jinja_template(
            conversations=[messages], tools=None, documents=None,
            chat_template=template,
            add_generation_prompt=add_generation_prompt, **kw)
        return out[0], "render_jinja_template"
    compiled = ctu._compile_jinja_template(template)
    return compiled.render(messages=messages, tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt,
                           **kw), "_compile_jinja_template"


def write_cases(path):
    """Expression/filter/loop cases for t/unit/jinja.c, expected values from
    jinja2 in transformers' configuration; error cases list constructs the
    C interpreter must refuse with the given message."""
    M = {"m": [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Yo"}], "s": "Hello World", "n": 7, "f": 2.5, "l": [3, 1, 2], "d": {"b": 1, "a": [1, "x", None, True, 1.5]}, "u": "héllo 你好🎉", "e": ""}
    T = [
     # output, literals, whitespace control
     "a{{ 1 }}b", "{{ 'x' ~ 1 ~ none ~ true }}", "{{ \"q\\\"\\n\\t\\u00e9\" }}", "{{ 'a' 'b' }}",
     "{{ 1 + 2 * 3 }}|{{ 7 // 2 }}|{{ -7 // 2 }}|{{ 7 % 3 }}|{{ -7 % 3 }}|{{ 7 / 2 }}|{{ 2 ** 10 }}|{{ 1.5 + 1 }}|{{ 0.1 + 0.2 }}|{{ 1e20 }}|{{ 1/3 }}",
     "{{ n > 5 and n < 10 }}|{{ not n }}|{{ 1 < 2 < 3 }}|{{ 'a' < 'b' }}|{{ n == 7.0 }}|{{ s != 'x' }}",
     "{{ 'ell' in s }}|{{ 'z' not in s }}|{{ 2 in l }}|{{ 'b' in d }}|{{ 'q' in undefined_thing }}",
     "{{ s if n > 3 else 'no' }}|{{ 'yes' if false }}|{{ 0 or 'x' }}|{{ 'a' and 'b' }}|{{ e or n }}",
     "  {% if true %}\n  x\n  {% endif %}\n  y\n", "a  {%- if true -%}  b  {%- endif -%}  c", "{{- ' a ' -}}  \n {{ 'b' }} {# c #}\n{#- d -#} e",
     "{% for i in l %}\n{{ i }}\n{% endfor %}\n", "x {%+ if true %}y{% endif %}", "line1\n    {% set q = 1 %}\nline2 {{ q }}\n",
     "{% if n == 1 %}one{% elif n == 7 %}seven{% else %}other{% endif %}",
     # loops
     "{% for x in l %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.revindex }}{{ loop.revindex0 }};{% endfor %}",
     "{% for x in [] %}a{% else %}empty{% endfor %}", "{% for x in l if x > 1 %}{{ x }}{{ loop.index }}{{ loop.length }},{% endfor %}",
     "{% for x in l %}{% if x == 1 %}{% continue %}{% endif %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}",
     "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}", "{% for k in d %}{{ k }}{% endfor %}", "{% for c in 'aé🎉' %}[{{ c }}]{% endfor %}",
     "{% for a in [1,2] %}{% for b in 'xy' %}{{ a }}{{ b }}{{ loop.index }} {% endfor %}{{ loop.index }}|{% endfor %}",
     "{% for x in l %}{{ loop.previtem }}-{{ loop.nextitem }};{% endfor %}",
     # set / scoping / namespace
     "{% set x = 1 %}{% for i in l %}{% set x = i %}{% endfor %}{{ x }}",
     "{% set ns = namespace(x=1, y='a') %}{% for i in l %}{% set ns.x = ns.x + i %}{% endfor %}{{ ns.x }}{{ ns.y }}",
     "{% set b %}in {{ n }}{% endset %}[{{ b }}]",
     # subscripts, slices, attributes
     "{{ m[0]['role'] }}{{ m[0].content }}{{ m[-1].role }}{{ d['a'][1] }}{{ d.a.1 }}|{{ m[5] }}|{{ d.zz }}|",
     "{{ l[1:] }}{{ l[:-1] }}{{ l[::-1] }}{{ l[::2] }}{{ s[1:4] }}{{ s[-5:] }}{{ u[1:3] }}{{ u[::-1] }}{{ u[6] }}",
     "{{ l }}|{{ d }}|{{ (1, 'a') }}|{{ (1,) }}|{{ {'k': \"it's\"} }}|{{ none }}|{{ [1.0, -0.5] }}",
     # filters
     "{{ m[0].content | trim }}|{{ '\u3000 x \u00a0' | trim }}|{{ s | length }}|{{ u | length }}|{{ s | upper }}|{{ s | lower }}|{{ 'hello wORLD-x' | title }}|{{ 'hELLO' | capitalize }}",
     "{{ s | replace('o', '0') }}|{{ s | replace('l', 'L', 2) }}|{{ undefined_v | default('dflt') }}|{{ e | default('dflt') }}|{{ e | default('dflt', true) }}|{{ n | d(3) }}",
     "{{ d | tojson }}|{{ m | tojson }}|{{ 'é\"\\n</x>' | tojson }}|{{ d | tojson(indent=2) }}|{{ {} | tojson }}|{{ [] | tojson(indent=4) }}|{{ f | tojson }}",
     "{{ l | join(', ') }}|{{ l | join }}|{{ l | first }}|{{ l | last }}|{{ 'abc' | list }}|{{ n | string }}|{{ '42' | int + 1 }}|{{ 'x' | int }}|{{ '2.5' | float }}|{{ d | items | list }}",
     "{{ m | map(attribute='role') | join(',') }}|{{ m | selectattr('role', 'equalto', 'user') | list | length }}|{{ m | rejectattr('role', 'eq', 'user') | map(attribute='content') | first }}|{{ l | select('odd') | list }}|{{ [1, none, 2] | reject('none') | list }}",
     "{{ -n | abs }}|{{ l | reverse | list }}|{{ s | count }}|{{ m | length - 1 }}",
     # tests
     "{{ n is defined }}{{ zz is defined }}{{ zz is undefined }}{{ none is none }}{{ s is string }}{{ d is mapping }}{{ l is iterable }}{{ s is sequence }}{{ n is number }}{{ f is float }}{{ n is integer }}{{ true is true }}{{ false is false }}{{ 1 is true }}{{ n is odd }}{{ n is even }}{{ 9 is divisibleby 3 }}{{ n is eq 7 }}{{ n is not none }}{{ 'ab' is lower }}",
     # methods
     "[{{ '  x  '.strip() }}][{{ 'xxaxx'.strip('x') }}][{{ '\\nab\\n'.lstrip('\\n') }}][{{ ' ab '.rstrip() }}]{{ s.startswith('He') }}{{ s.endswith(('x', 'ld')) }}{{ s.split() }}{{ 'a,b,,c'.split(',') }}{{ 'a b c'.split(' ', 1) }}{{ s.split('o')[-1] }}",
     "{{ s.upper() }}{{ s.lower() }}{{ 'hi there'.title() }}{{ s.replace('l', '') }}{{ d.get('b') }}{{ d.get('zz') }}{{ d.get('zz', 5) }}{{ d.keys() | list }}{{ d.values() | length }}{{ s.find('o') }}{{ ', '.join(['a', 'b']) }}",
     "{{ range(3) | list }}{{ range(1, 7, 2) | list }}{% for i in range(2) %}{{ i }}{% endfor %}",
     "{{ '</think>' in '<think>\\nr\\n</think>\\n\\nans' }}|{{ ('<think>\\nr\\n</think>\\n\\nans'.split('</think>')[-1].lstrip('\\n')) }}|{{ 'x<think>\\nr\\n</think>'.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') }}",
     "{% for message in m %}{{ message.role }}{% if not loop.last %},{% endif %}{% endfor %}",
     "{{ 'a' * 3 }}{{ [1] * 2 }}{{ l + [4] }}{{ 'x' + 'y' }}",
    ]
    E = [
     ("{{ raise_exception('bad roles') }}", "bad roles"),
     ("{{ s | frobnicate }}", "unsupported filter 'frobnicate' at line 1"),
     ("\n\n{{ n is frob }}", "unsupported test 'frob' at line 3"),
     ("{% macro f() %}x{% endmacro %}", "unsupported statement 'macro' at line 1"),
     ("{% raw %}x{% endraw %}", "unsupported statement 'raw'"),
     ("{{ s.zfill(3) }}", "unsupported method 'zfill'"),
     ("{{ cycler(1) }}", "unsupported function 'cycler'"),
     ("{{ zz + 1 }}", "'zz' is undefined"),
     ("{{ zz.attr }}", "'zz' is undefined"),
     ("{{ 'a' + 1 }}", "unsupported operand"),
     ("{{ 1 / 0 }}", "division by zero"),
     ("{% if true %}x", "missing 'endif'"),
     ("{% for x in l %}x{% endif %}", "unexpected 'endif' at line 1"),
     ("{{ 1 + }}", "unexpected"),
     ("{{ 'abc }}", "unterminated string"),
     ("{% break %}", "outside a loop"),
     ("{% set x.y = 1 %}", "non-namespace"),
     ("{{ n | tojson(ensure_ascii=true) }}", "unsupported tojson"),
     ("{% for x in n %}{% endfor %}", "not iterable"),
     ("{{ " + "(" * 300 + "1" + ")" * 300 + " }}", "nested too deeply"),
     ("{{ 'x' * 100000000 }}", "too large"),
     ("{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}", "template render"),
    ]
    out = {"vars_json": json.dumps(M, ensure_ascii=False), "render": [],
           "errors": [{"template": t, "error": msg} for t, msg in E]}
    for t in T:
        out["render"].append({"template": t,
                              "expected": mimic_compile(t).render(**M)})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("wrote %s: %d render cases, %d error cases" % (path, len(T), len(E)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(DATA, "goldens.json"))
    ap.add_argument("--cases", help="write the expression cases (jinja2 "
                    "only) to this file and exit")
    args = ap.parse_args()
    if args.cases:
        write_cases(args.cases)
        return

    import jinja2
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None

    convs = json.load(open(os.path.join(DATA, "conversations.json"),
                           encoding="utf-8"))
    cases = []
    how = None
    for name in sorted(TOKENS):
        path = os.path.join(DATA, "templates", name + ".jinja")
        with open(path, encoding="utf-8", newline="") as f:
            template = f.read()
        bos, eos = TOKENS[name]
        for conv in convs:
            case = {"template": name, "conversation": conv["name"]}
            try:
                text, how = render(template, conv["messages"],
                                   conv["add_generation_prompt"], bos, eos)
                case["error"] = False
                case["expected"] = text
            except Exception as e:  # TemplateError, UndefinedError, ...
                case["error"] = True
                case["message"] = "%s: %s" % (type(e).__name__, e)
            cases.append(case)

    doc = {
        "generator": "tools/chat_goldens.py",
        "transformers": tf_version,
        "jinja2": jinja2.__version__,
        "python": sys.version.split()[0],
        "method": how,
        "tokens": {k: {"bos_token": v[0], "eos_token": v[1]}
                   for k, v in TOKENS.items()},
        "cases": cases,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    errs = sum(1 for c in cases if c["error"])
    print("wrote %s: %d cases (%d expected errors), transformers %s, "
          "jinja2 %s" % (args.out, len(cases), errs,
                         tf_version, jinja2.__version__))


if __name__ == "__main__":
    main()
