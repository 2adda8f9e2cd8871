"""Domains: an index + an adapter under one name, and routing of queries to them."""

from retro_peft.domains.registry import (
    AUTO, DomainSpec, add_domain, check_domain_name, get_domain, list_domains, remove_domain,
)
from retro_peft.domains.routing import RouteDecision, Router, RouterConfig

__all__ = [
    "AUTO", "DomainSpec", "RouteDecision", "Router", "RouterConfig", "add_domain", "check_domain_name",
    "get_domain", "list_domains", "remove_domain",
]
