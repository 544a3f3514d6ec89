"""Clients for the app's storage account, built lazily from the storage connection setting.

The SDKs are imported here, inside the functions, so importing the function app stays cheap.
"""

from __future__ import annotations

from contextlib import suppress
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from azure.data.tables import TableServiceClient
    from azure.storage.blob import BlobServiceClient, ContainerClient

    from shared.settings import StorageConnection


def _credential(connection: StorageConnection) -> Any:
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if connection.use_managed_identity:
        return ManagedIdentityCredential(client_id=connection.managed_identity_client_id)
    return DefaultAzureCredential(managed_identity_client_id=connection.managed_identity_client_id)


@lru_cache(maxsize=8)
def blob_service(connection: StorageConnection) -> BlobServiceClient:
    from azure.storage.blob import BlobServiceClient

    if connection.connection_string is not None:
        return BlobServiceClient.from_connection_string(connection.connection_string)
    return BlobServiceClient(connection.blob_service_uri or "", credential=_credential(connection))


@lru_cache(maxsize=8)
def table_service(connection: StorageConnection) -> TableServiceClient:
    from azure.data.tables import TableServiceClient

    if connection.connection_string is not None:
        return TableServiceClient.from_connection_string(connection.connection_string)
    return TableServiceClient(connection.table_service_uri or "", credential=_credential(connection))


def container(connection: StorageConnection, name: str) -> ContainerClient:
    """A blob container of the app's, created if missing (safe when handlers race to create it)."""
    from azure.core.exceptions import ResourceExistsError

    client = blob_service(connection).get_container_client(name)
    with suppress(ResourceExistsError):
        client.create_container()
    return client
