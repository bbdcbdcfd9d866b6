"""A local stand-in for Microsoft Entra ID, managed identity, the Azure ML control plane (ARM) and a
managed online endpoint's scoring front end. For tests, `gateway demo` and benchmarks only: production
code must never import it.
"""

from gateway.emulator.app import create_app
from gateway.emulator.msal_http import MsalHttpxClient
from gateway.emulator.server import EmulatorServer, run_cli
from gateway.emulator.state import EmulatorState, Fault, ManagedIdentity, RegisteredApp
from gateway.emulator.tls import ClientCertificate, TlsFiles, generate_client_certificate, generate_tls

__all__ = [
    "ClientCertificate",
    "EmulatorServer",
    "EmulatorState",
    "Fault",
    "ManagedIdentity",
    "MsalHttpxClient",
    "RegisteredApp",
    "TlsFiles",
    "create_app",
    "generate_client_certificate",
    "generate_tls",
    "run_cli",
]
