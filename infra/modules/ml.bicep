// The Azure ML side: a workspace (new with its dependencies, or an existing one), a GPU cluster
// that costs nothing idle, and the system topic that reports job status to the app.
//
// Jobs read their inputs and write their outputs with the compute cluster's identity, not the
// submitter's (Azure ML docs, "Data administration"), and an identity set on a pipeline that holds
// pipeline components does not apply ("Set up authentication between Azure Machine Learning and
// other services"). So the cluster gets a user-assigned identity of its own: Storage Blob Data
// Reader on the app's `prepared` container (app.bicep) and Storage Blob Data Contributor on the
// workspace's storage, where job outputs and models go (both accounts refuse shared keys).
param location string
param tags object
param suffix string
param createWorkspace bool
param workspaceName string
@description('The workspace\'s storage account, in this resource group (empty: not known, no role granted).')
param workspaceStorageAccountName string
@description('The workspace\'s Event Grid system topic: new, or the one it already has (one per source).')
param workspaceEventsTopicName string
param computeVmSize string
param computeMaxNodes int

var computeClusterName = 'gpu-finetune'
var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

module newWorkspace 'new-workspace.bicep' = if (createWorkspace) {
  name: 'new-workspace'
  params: {
    location: location
    tags: tags
    suffix: suffix
    workspaceName: workspaceName
  }
}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' existing = {
  name: workspaceName
}

resource computeIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-compute-${suffix}'
  location: location
  tags: tags
}

resource cluster 'Microsoft.MachineLearningServices/workspaces/computes@2024-10-01' = {
  parent: workspace
  name: computeClusterName
  location: location
  tags: tags
  dependsOn: [newWorkspace]
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${computeIdentity.id}': {} }
  }
  properties: {
    computeType: 'AmlCompute'
    disableLocalAuth: true
    properties: {
      vmSize: computeVmSize
      vmPriority: 'Dedicated'
      scaleSettings: {
        minNodeCount: 0
        maxNodeCount: computeMaxNodes
        nodeIdleTimeBeforeScaleDown: 'PT10M'
      }
      remoteLoginPortPublicAccess: 'Disabled'
      enableNodePublicIp: true
    }
  }
}

resource workspaceStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = if (!empty(workspaceStorageAccountName)) {
  name: workspaceStorageAccountName
}

resource computeOutputsAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(workspaceStorageAccountName)) {
  name: guid(resourceGroup().id, workspaceStorageAccountName, computeIdentity.id, storageBlobDataContributor)
  scope: workspaceStorage
  dependsOn: [newWorkspace]
  properties: {
    principalId: computeIdentity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
  }
}

// Job status events; the subscriptions to the job_events function are created after deployment.
// A source has at most one system topic ("System topics in Azure Event Grid"): for an existing
// workspace that has one, this names it, and the deployment updates it (adding the identity that
// dead-letters) instead of failing on a second one.
resource workspaceEvents 'Microsoft.EventGrid/systemTopics@2024-06-01-preview' = {
  name: workspaceEventsTopicName
  location: workspace.location // a system topic lives where its source does
  tags: tags
  identity: { type: 'SystemAssigned' }
  dependsOn: [newWorkspace]
  properties: {
    source: workspace.id
    topicType: 'Microsoft.MachineLearningServices.Workspaces'
  }
}

output workspaceName string = workspaceName
output workspaceId string = workspace.id
output workspacePrincipalId string = workspace.identity.principalId
output computeClusterName string = cluster.name
output computePrincipalId string = computeIdentity.properties.principalId
output workspaceEventsTopicName string = workspaceEvents.name
output workspaceEventsPrincipalId string = workspaceEvents.identity.principalId
