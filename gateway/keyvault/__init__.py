"""`{keyvault: {vault: URL, secret: NAME}}`: secrets read from Azure Key Vault and polled for new versions.

- `client`: Key Vault's secrets REST API (read, write, tag), through the one Azure REST helper;
- `vaults`: the secrets a configuration uses, their checks and the poll loop of each vault.

The assembly (`gateway.assembly`) builds one `KeyVaults` per process; `gateway check` prints what it
holds, `gateway rotate` writes new versions with its client.
"""

from gateway.keyvault.client import MAX_VALUE_CHARS, KeyVaultClient, KeyVaultError, SecretVersion
from gateway.keyvault.vaults import KeyVaults, KeyVaultSecret, Vault, refetcher

__all__ = [
    "MAX_VALUE_CHARS",
    "KeyVaultClient",
    "KeyVaultError",
    "KeyVaultSecret",
    "KeyVaults",
    "SecretVersion",
    "Vault",
    "refetcher",
]
