// What the function's identity may do in the workspace: submit jobs, register and deploy models
// (AzureML Data Scientist), and read endpoint metrics for idle detection (Monitoring Reader).
param workspaceName string
param functionPrincipalId string

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
