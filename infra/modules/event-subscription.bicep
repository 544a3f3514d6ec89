// One Event Grid subscription on a system topic: webhook delivery with retries, then
// dead-lettering to storage with the topic's own identity (the account accepts no shared keys).
param topicName string
param subscriptionName string
param eventFilter object
param deadLetterAccountId string
param deadLetterContainer string

@secure()
param endpointUrl string

resource topic 'Microsoft.EventGrid/systemTopics@2024-06-01-preview' existing = {
  name: topicName
}

resource eventSubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2024-06-01-preview' = {
  parent: topic
  name: subscriptionName
  properties: {
    destination: {
      endpointType: 'WebHook'
      properties: { endpointUrl: endpointUrl }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: eventFilter
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    deadLetterWithResourceIdentity: {
      identity: { type: 'SystemAssigned' }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: deadLetterAccountId
          blobContainerName: deadLetterContainer
        }
      }
    }
  }
}
