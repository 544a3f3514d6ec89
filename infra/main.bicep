// The whole system: the function app and its storage, monitoring, Event Grid, and an Azure ML
// workspace (new, or an existing one) with a GPU cluster that scales to zero.
targetScope = 'subscription'

@minLength(1)
@maxLength(40)
@description('azd environment name; names and tags every resource.')
param environmentName string

@minLength(1)
@description('Region for every resource. Pick one with A100 quota for fine-tuning.')
param location string

@description('Use this existing Azure ML workspace instead of creating one (empty: create one).')
param existingWorkspaceName string = ''

@description('Resource group of the existing workspace (empty: the one azd creates).')
param existingWorkspaceResourceGroup string = ''

@description('Storage account of the existing workspace, in its resource group: the GPU cluster\'s identity gets Storage Blob Data Contributor on it, to write job outputs (empty: grant that role yourself).')
param existingWorkspaceStorageAccount string = ''

@description('The Event Grid system topic the existing workspace already has, if any: a resource has at most one, so it is reused (empty: one is created).')
param existingWorkspaceEventsTopic string = ''

@description('GPU VM size for fine-tuning: an A100 or H100 size the model supports for fine-tuning (Phi-4: system metadata supportedComputes.finetuneComputes). NCv3 sizes are retired.')
@allowed([
  'Standard_NC24ads_A100_v4'
  'Standard_NC48ads_A100_v4'
  'Standard_NC96ads_A100_v4'
  'Standard_ND96asr_v4'
  'Standard_ND96amsr_A100_v4'
  'Standard_NC40ads_H100_v5'
  'Standard_NC80adis_H100_v5'
  'Standard_ND96isr_H100_v5'
])
param computeVmSize string = 'Standard_NC24ads_A100_v4'

@minValue(1)
@description('Most nodes the GPU cluster may scale to (it scales to 0 when idle).')
param computeMaxNodes int = 2

@description('GPUs per node of computeVmSize (NC24ads and NC40ads 1, NC48ads and NC80adis 2, NC96ads 4, ND96 8).')
param gpusPerNode string = '1'

@description('How jobs fine-tune: azureml (the registry pipeline on the GPU cluster) or azureml-finetune (Azure ML\'s fine-tuning job: serverless, or on managed compute; see finetuneCompute).')
@allowed([
  'azureml'
  'azureml-finetune'
])
param mlBackend string = 'azureml'

@description('With mlBackend azureml-finetune: serverless (no GPU quota, billed per token; pick a region where the model is fine-tuned serverless) or a GPU VM size for managed compute.')
param finetuneCompute string = 'serverless'

@description('Registry model to fine-tune, name[:version] (auto: the newest fine-tunable Phi chat model in the azureml registry; empty: the backend\'s default, Phi-4 for azureml, Phi-4-mini-instruct for azureml-finetune).')
param baseModel string = ''

@description('VM size of online deployments; checked against the sizes the model supports for inference (system metadata supportedComputes.inferenceComputes, or the older inference_compute_allow_list tag).')
param inferenceInstanceType string = 'Standard_NC24ads_A100_v4'

@description('NCRONTAB schedule of the endpoint janitor.')
param janitorSchedule string = '0 */10 * * * *'

var tags = { 'azd-env-name': environmentName, 'managed-by': 'finetune-on-upload' }
// The workspace datastore on the app's `prepared` container (AZUREML_DATASTORE).
var preparedDatastoreName = 'finetune_prepared'
var suffix = toLower(uniqueString(subscription().id, environmentName, location))
var createWorkspace = empty(existingWorkspaceName)

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

var workspaceResourceGroupName = empty(existingWorkspaceResourceGroup) ? rg.name : existingWorkspaceResourceGroup

module app 'modules/app.bicep' = {
  name: 'app'
  scope: rg
  params: {
    location: location
    tags: tags
    suffix: suffix
    workspaceResourceGroupName: workspaceResourceGroupName
    workspaceName: ml.outputs.workspaceName
    workspacePrincipalId: ml.outputs.workspacePrincipalId
    workspaceEventsPrincipalId: ml.outputs.workspaceEventsPrincipalId
    computePrincipalId: ml.outputs.computePrincipalId
    computeClusterName: ml.outputs.computeClusterName
    preparedDatastoreName: preparedDatastoreName
    gpusPerNode: gpusPerNode
    janitorSchedule: janitorSchedule
    baseModel: baseModel
    mlBackend: mlBackend
    finetuneCompute: finetuneCompute
    inferenceInstanceType: inferenceInstanceType
    workspaceId: ml.outputs.workspaceId
    identityName: 'id-${suffix}'
  }
}

module ml 'modules/ml.bicep' = {
  name: 'ml'
  scope: resourceGroup(workspaceResourceGroupName)
  dependsOn: [rg]
  params: {
    location: location
    tags: tags
    suffix: suffix
    createWorkspace: createWorkspace
    workspaceName: createWorkspace ? 'mlw-${suffix}' : existingWorkspaceName
    workspaceStorageAccountName: createWorkspace ? 'stml${suffix}' : existingWorkspaceStorageAccount
    workspaceEventsTopicName: empty(existingWorkspaceEventsTopic) ? 'evgt-ml-${suffix}' : existingWorkspaceEventsTopic
    computeVmSize: computeVmSize
    computeMaxNodes: computeMaxNodes
  }
}

module mlAccess 'modules/ml-access.bicep' = {
  name: 'ml-access'
  scope: resourceGroup(workspaceResourceGroupName)
  params: {
    workspaceName: ml.outputs.workspaceName
    functionPrincipalId: app.outputs.identityPrincipalId
    preparedDatastoreName: preparedDatastoreName
    appStorageAccountName: app.outputs.storageAccountName
    appResourceGroupName: rg.name
    preparedContainerName: app.outputs.preparedContainerName
  }
}

output AZURE_LOCATION string = location
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = app.outputs.functionAppName
output AZURE_STORAGE_ACCOUNT_NAME string = app.outputs.storageAccountName
output AZUREML_WORKSPACE_NAME string = ml.outputs.workspaceName
output AZUREML_WORKSPACE_RESOURCE_GROUP string = workspaceResourceGroupName
output AZUREML_COMPUTE_CLUSTER string = ml.outputs.computeClusterName
output AZUREML_DATASTORE string = preparedDatastoreName
output STORAGE_EVENTS_TOPIC_NAME string = app.outputs.storageEventsTopicName
output WORKSPACE_EVENTS_TOPIC_NAME string = ml.outputs.workspaceEventsTopicName
output DEAD_LETTER_CONTAINER string = app.outputs.deadLetterContainerName
