// A new Azure ML workspace with what it depends on: storage, a key vault, Application Insights.
param location string
param tags object
param suffix string
param workspaceName string

resource workspaceStorage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_206:Zone-redundant (ZRS); geo-replication would double the cost of data that is re-creatable (prepared files, job outputs) or the user's own copy.
  // checkov:skip=CKV_AZURE_35:The workspace (studio, compute, registry pulls) reaches its storage without a virtual network here; access needs Entra ID.
  // checkov:skip=CKV_AZURE_43:The name is 'stml' + uniqueString(): lowercase letters and digits, which checkov cannot evaluate.
  name: 'stml${suffix}'
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_ZRS' }
  properties: {
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
  }
}

resource workspaceVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109:No virtual network here to allow-list; access is RBAC-only (enableRbacAuthorization).
  // checkov:skip=CKV_AZURE_189:The workspace and its compute reach the vault without private endpoints in this deployment; access is RBAC-only.
  // checkov:skip=CKV_AZURE_110:Purge protection cannot be turned off once on, and azd down --purge skips a protected vault, so its fixed name would block azd up for the retention period; soft delete stays on.
  // checkov:skip=CKV_AZURE_42:Recoverable through soft delete (7 days); purge protection is left off for the reason above.
  name: 'kv-${suffix}'
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    // enablePurgeProtection is left out: once true it can never be false, and `azd down --purge`
    // purges only unprotected vaults (azure-dev, bicep_provider.go), so `azd up` again within the
    // retention window would fail on the name kv-<suffix>.
    softDeleteRetentionInDays: 7
  }
}

resource workspaceInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-ml-${suffix}'
  location: location
  tags: tags
  kind: 'web'
  properties: { Application_Type: 'web', DisableLocalAuth: true }
}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' = {
  // checkov:skip=CKV_AZURE_243:No private endpoint: the function app on Flex Consumption calls the workspace without virtual network integration.
  name: workspaceName
  location: location
  tags: tags
  identity: { type: 'SystemAssigned' }
  properties: {
    friendlyName: 'Fine-tune on upload'
    storageAccount: workspaceStorage.id
    keyVault: workspaceVault.id
    applicationInsights: workspaceInsights.id
    systemDatastoresAuthMode: 'identity'
    publicNetworkAccess: 'Enabled'
  }
}
