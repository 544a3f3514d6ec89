// What the function's identity may do in the workspace: submit jobs, register and deploy models
// (AzureML Data Scientist), and read endpoint metrics for idle detection (Monitoring Reader). And
// the datastore through which jobs read the app's prepared files.
param workspaceName string
param functionPrincipalId string
param preparedDatastoreName string
param appStorageAccountName string
param appResourceGroupName string
param preparedContainerName string

var roles = [
  'f6c7c914-8db3-469d-8ca1-694a8f32e121' // AzureML Data Scientist
  '43d0d8ad-25c7-4714-9337-8ba259a9fe05' // Monitoring Reader
]

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' existing = {
  name: workspaceName
}

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in roles: {
    name: guid(workspace.id, functionPrincipalId, role)
    scope: workspace
    properties: {
      principalId: functionPrincipalId
      principalType: 'ServicePrincipal'
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    }
  }
]

// Identity-based (no credentials stored): a job reads through it with the compute cluster's
// identity; the studio previews data with the workspace's ("Data administration"). A datastore
// is one container, so job inputs are azureml://datastores/<name>/paths/<run>/<file>.
resource preparedDatastore 'Microsoft.MachineLearningServices/workspaces/datastores@2024-10-01' = {
  parent: workspace
  name: preparedDatastoreName
  properties: {
    datastoreType: 'AzureBlob'
    description: 'Prepared fine-tuning data of the function app (train_sft.jsonl, test_sft.jsonl per run)'
    accountName: appStorageAccountName
    containerName: preparedContainerName
    endpoint: environment().suffixes.storage
    protocol: 'https'
    subscriptionId: subscription().subscriptionId
    resourceGroup: appResourceGroupName
    serviceDataAccessAuthIdentity: 'WorkspaceSystemAssignedIdentity'
    credentials: { credentialsType: 'None' }
  }
}
