// The Azure ML side: a workspace (new with its dependencies, or an existing one), a GPU cluster
// that costs nothing idle, and the system topic that reports job status to the app.
param location string
param tags object
param suffix string
param createWorkspace bool
param workspaceName string
param computeVmSize string
param computeMaxNodes int

var computeClusterName = 'gpu-finetune'

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

resource cluster 'Microsoft.MachineLearningServices/workspaces/computes@2024-10-01' = {
  parent: workspace
  name: computeClusterName
  location: location
  tags: tags
  dependsOn: [newWorkspace]
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

// Job status events; the subscription to the job_events function is created after deployment.
resource workspaceEvents 'Microsoft.EventGrid/systemTopics@2024-06-01-preview' = {
  name: 'evgt-ml-${suffix}'
  location: location
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
output workspaceEventsTopicName string = workspaceEvents.name
output workspaceEventsPrincipalId string = workspaceEvents.identity.principalId
