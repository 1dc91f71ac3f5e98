"""The request distributor: one OpenAI-compatible address in front of many splitfuse servers."""

from app.proxy.app import ProxyConfig, create_app
from app.proxy.node_client import NodeRegistration
from app.proxy.strategies import Strategy

__all__ = ["NodeRegistration", "ProxyConfig", "Strategy", "create_app"]
