"""A token reduction chosen on the command line for a trained checkpoint, with no retraining.

`segm.eval.miou`, `segm.inference` and `segm.bench` accept `--policy-method` (with
`--num-tokens-shared`/`--token-reduction`, and `--policynet-ckpt` for `policy_net`) to run a
checkpoint, typically one trained without sharing, with CTS and another policy and budget, or
`--reducer NAME[:KEY=VALUE,...]` for any registered reducer (beside `--policy-method`: on CTS's
tokens, for a reducer that stacks on CTS, e.g. algm). The checkpoint file is never
modified; what was used is recorded in the outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import click

from segm.model.reduction.policy_rules import check_policy_options
from segm.model.reduction.rules import NO_SHARING, POLICY_METHODS, ModelConfigError, parse_reducer


@dataclass(frozen=True)
class PolicyChoice:
    method: str
    num_shared: int | None = None
    token_reduction: float | None = None
    policynet_ckpt: str | None = None
    policy_backbone: str | None = None
    reducer: dict | None = None  # {name, settings} of a registered reducer other than CTS (on CTS's
    # tokens when `method` shares them)


def policy_options(command):
    """The click options of a reduction choice (`policy_choice` turns them into a PolicyChoice)."""
    options = [
        click.option("--policy-method", type=click.Choice(POLICY_METHODS), default=None,
                     help="Run the checkpoint with CTS and this token-sharing policy instead of its own, without "
                          "retraining (e.g. content on a no_sharing checkpoint) [default: the checkpoint's]."),
        click.option("--num-tokens-shared", type=int, default=None,
                     help="S, shared superpatches per window, with --policy-method."),
        click.option("--token-reduction", type=float, default=None,
                     help="Token reduction rho instead of S (S = round(rho*N/3)), with --policy-method."),
        click.option("--policynet-ckpt", type=str, default=None, help="Policy-network model.pth (policy_net)."),
        click.option("--policy-backbone", type=str, default=None,
                     help="The policy network's backbone [default: as recorded beside --policynet-ckpt]."),
        click.option("--reducer", "reducer", type=str, default=None, metavar="NAME[:KEY=VALUE,...]",
                     help="Run the checkpoint with this registered token reducer instead of its own, without "
                          "retraining (CTS is chosen with --policy-method; both together: the reducer acts on "
                          "CTS's tokens, e.g. algm)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def policy_choice(policy_method=None, num_tokens_shared=None, token_reduction=None, policynet_ckpt=None,
                  policy_backbone=None, reducer=None) -> PolicyChoice | None:
    """The choice the options make, or None (the checkpoint's own reduction)."""
    if reducer is not None and policy_method is None:
        policy_method = NO_SHARING
    if policy_method is None:
        given = [name for name, value in (("--num-tokens-shared", num_tokens_shared),
                                          ("--token-reduction", token_reduction),
                                          ("--policynet-ckpt", policynet_ckpt),
                                          ("--policy-backbone", policy_backbone)) if value is not None]
        if given:
            raise ModelConfigError(f"{', '.join(given)} choose(s) a token budget or policy: give --policy-method too")
        return None
    check_policy_options(policy_method, policynet_ckpt, policy_backbone)  # not ignored silently
    return PolicyChoice(policy_method, num_tokens_shared, token_reduction, policynet_ckpt, policy_backbone,
                        None if reducer is None else parse_reducer(reducer))


def apply_policy_choice(model, variant: dict, choice: PolicyChoice | None):
    """(model, variant) running with `choice`; unchanged when it is None. The returned variant
    is a copy whose `net_kwargs` describe the model that runs."""
    if choice is None:
        return model, variant
    from segm.model.factory import reshare

    shared, net = reshare(model, variant["net_kwargs"], choice.method, num_shared=choice.num_shared,
                          token_reduction=choice.token_reduction, policynet_ckpt=choice.policynet_ckpt,
                          policy_backbone=choice.policy_backbone, reducer=choice.reducer)
    return shared, {**variant, "net_kwargs": net}
