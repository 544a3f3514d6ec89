// Event Grid subscriptions that deliver to the function app's webhooks. They need the app's
// extension keys, which exist only once the code is deployed, so infra/hooks/postdeploy.sh
// deploys this file after `azd deploy`.
targetScope = 'subscription'

param appResourceGroup string
param workspaceResourceGroup string
param functionAppHostName string
param storageEventsTopicName string
param workspaceEventsTopicName string
param storageAccountName string
param deadLetterContainer string

@secure()
@description('The function app\'s blobs_extension system key.')
param blobsExtensionKey string

@secure()
@description('The function app\'s eventgrid_extension system key.')
param eventGridExtensionKey string

var deadLetterAccountId = resourceId(subscription().subscriptionId, appResourceGroup, 'Microsoft.Storage/storageAccounts', storageAccountName)

module uploads 'modules/event-subscription.bicep' = {
  name: 'dataset-uploads'
  scope: resourceGroup(appResourceGroup)
  params: {
    topicName: storageEventsTopicName
    subscriptionName: 'dataset-uploads'
    endpointUrl: 'https://${functionAppHostName}/runtime/webhooks/blobs?functionName=Host.Functions.dataset_intake&code=${blobsExtensionKey}'
    deadLetterAccountId: deadLetterAccountId
    deadLetterContainer: deadLetterContainer
    eventFilter: {
      includedEventTypes: ['Microsoft.Storage.BlobCreated']
      subjectBeginsWith: '/blobServices/default/containers/datasets/'
    }
  }
}

module jobStatus 'modules/event-subscription.bicep' = {
  name: 'job-status'
  scope: resourceGroup(workspaceResourceGroup)
  params: {
    topicName: workspaceEventsTopicName
    subscriptionName: 'job-status'
    endpointUrl: 'https://${functionAppHostName}/runtime/webhooks/EventGrid?functionName=job_events&code=${eventGridExtensionKey}'
    deadLetterAccountId: deadLetterAccountId
    deadLetterContainer: deadLetterContainer
    // Only finished pipeline jobs: their steps (azureml.StepRun) and non-terminal statuses
    // would wake the function for nothing. Event Grid compares strings case-insensitively.
    eventFilter: {
      includedEventTypes: ['Microsoft.MachineLearningServices.RunStatusChanged']
      advancedFilters: [
        { operatorType: 'StringIn', key: 'data.runType', values: ['azureml.PipelineRun'] }
        { operatorType: 'StringIn', key: 'data.runStatus', values: ['Completed', 'Failed', 'Canceled'] }
      ]
    }
  }
}
