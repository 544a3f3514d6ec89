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

var jobEventsUrl = 'https://${functionAppHostName}/runtime/webhooks/EventGrid?functionName=job_events&code=${eventGridExtensionKey}'
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

// Two subscriptions, because a success may come either way: RunCompleted is documented as the
// success event and carries no runStatus (an advanced filter on data.runStatus would drop it:
// "Understand event filtering for Event Grid subscriptions"), while RunStatusChanged reports
// Completed, Failed and Canceled. The function handles duplicates; it ignores jobs it did not submit.
module jobStatus 'modules/event-subscription.bicep' = {
  name: 'job-status'
  scope: resourceGroup(workspaceResourceGroup)
  params: {
    topicName: workspaceEventsTopicName
    subscriptionName: 'job-status'
    endpointUrl: jobEventsUrl
    deadLetterAccountId: deadLetterAccountId
    deadLetterContainer: deadLetterContainer
    // Only final statuses: the others would wake the function for nothing. No filter on
    // data.runType: the documented samples carry "runType": null, which a StringIn filter drops;
    // the function itself ignores step runs and jobs it did not submit. Event Grid compares
    // strings case-insensitively.
    eventFilter: {
      includedEventTypes: ['Microsoft.MachineLearningServices.RunStatusChanged']
      advancedFilters: [
        { operatorType: 'StringIn', key: 'data.runStatus', values: ['Completed', 'Failed', 'Canceled'] }
      ]
    }
  }
}

module jobCompleted 'modules/event-subscription.bicep' = {
  name: 'job-completed'
  scope: resourceGroup(workspaceResourceGroup)
  dependsOn: [jobStatus]
  params: {
    topicName: workspaceEventsTopicName
    subscriptionName: 'job-completed'
    endpointUrl: jobEventsUrl
    deadLetterAccountId: deadLetterAccountId
    deadLetterContainer: deadLetterContainer
    // No advanced filter: RunCompleted has no runStatus, and its documented sample has
    // "runType": null; a StringIn filter drops an event whose key is missing or null.
    eventFilter: {
      includedEventTypes: ['Microsoft.MachineLearningServices.RunCompleted']
    }
  }
}
