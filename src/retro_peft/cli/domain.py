"""`retro-peft domain add|list|show|remove`: the domain registry."""

from __future__ import annotations

import json

from retro_peft.cli import abstain_at, add_answer_arguments, add_history_argument, add_kv_cache_arguments
from retro_peft.domains import add_domain, get_domain, list_domains, remove_domain


def register(sub) -> None:
    domain = sub.add_parser("domain", help="register domains (an index + an optional adapter under one name)")
    cmds = domain.add_subparsers(dest="domain_command", required=True, metavar="ACTION")

    p = cmds.add_parser("add", help="register a domain")
    p.add_argument("name", help="domain name: letters, digits, '_', '.', '-' ('auto' is reserved)")
    p.add_argument("--index", required=True, help="index name (under $RETRO_PEFT_HOME/indexes) or a path")
    p.add_argument("--adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--description", help="what the domain covers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing domain of that name")
    add_kv_cache_arguments(p)  # the file is computed when the domain is first loaded
    add_answer_arguments(p, "default: free answers; a request's own choices come first",
                         "the rate the head was calibrated for")
    add_history_argument(p, "the adapter's, else none")
    p.set_defaults(func=_add)

    p = cmds.add_parser("list", help="list registered domains")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)

    p = cmds.add_parser("show", help="show one domain")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)

    p = cmds.add_parser("remove", help="forget a domain (its index and adapter are kept)")
    p.add_argument("name")
    p.set_defaults(func=_remove)


def _add(args) -> int:
    spec = add_domain(args.name, args.index, adapter=args.adapter, description=args.description,
                      overwrite=args.overwrite, kv_cache=args.kv_cache, kv_layout=args.kv_layout,
                      choices=args.choices, abstain_at=abstain_at(args), history=args.history)
    cache = f", frozen KV cache {spec.kv_cache} ({spec.kv_layout or 'block'})" if spec.kv_cache else ""
    answers = f", choices {','.join(spec.choices)}" if spec.choices else ""
    history = f", history {spec.history}" if spec.history else ""
    print(f"added domain {spec.name}: index {spec.index}, adapter {spec.adapter or '(none: base model)'}{cache}"
          f"{answers}{history}")
    return 0


def _list(args) -> int:
    specs = list_domains()
    if args.json:
        print(json.dumps([s.to_dict() for s in specs]))
        return 0
    if not specs:
        print("no domains (add one with: retro-peft domain add NAME --index INDEX)")
    for s in specs:
        desc = f"  {s.description}" if s.description else ""
        cache = f"\tkv_cache={s.kv_cache} ({s.kv_layout or 'block'})" if s.kv_cache else ""
        answers = f"\tchoices={','.join(s.choices)}" if s.choices else ""
        history = f"\thistory={s.history}" if s.history else ""
        print(f"{s.name}\tindex={s.index}\tadapter={s.adapter or '-'}{cache}{answers}{history}{desc}")
    return 0


def _show(args) -> int:
    spec = get_domain(args.name)
    if args.json:
        print(json.dumps(spec.to_dict()))
        return 0
    for key, value in spec.to_dict().items():
        value = ",".join(value) if isinstance(value, tuple) else value  # choices, as --choices takes them
        print(f"{key:12s} {value if value is not None else '-'}")
    return 0


def _remove(args) -> int:
    spec = remove_domain(args.name)
    if spec is None:  # its file was unreadable: nothing to say about its index or adapter
        print(f"removed domain {args.name} (its file was unreadable)")
    else:
        print(f"removed domain {spec.name} (index {spec.index} and adapter left in place)")
    return 0
