// The function app (Flex Consumption, Python 3.11) with its own storage, identity and monitoring.
param location string
param tags object
param suffix string
param identityName string
param workspaceResourceGroupName string
param workspaceName string
param workspacePrincipalId string
param workspaceEventsPrincipalId string
param computePrincipalId string
param computeClusterName string
param preparedDatastoreName string
param gpusPerNode string
param janitorSchedule string
param baseModel string
param inferenceInstanceType string
param mlBackend string
param finetuneCompute string
param workspaceId string

var datasetsContainer = 'datasets'
var preparedContainer = 'prepared'
var deadLetterContainer = 'dead-letter'
var deploymentContainer = 'app-package'
var runsTable = 'runs'
var functionAppName = 'func-${suffix}'

var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageBlobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  eventGridDataSender: 'd5a91429-5739-47e2-a06b-3470a27159e7'
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: identityName
  location: location
  tags: tags
}

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-${suffix}'
  location: location
  tags: tags
  properties: {
    retentionInDays: 30
    sku: { name: 'PerGB2018' }
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-${suffix}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    DisableLocalAuth: true
  }
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_206:Zone-redundant (ZRS); geo-replication would double the cost of data that is re-creatable (prepared files, job outputs) or the user's own copy.
  // checkov:skip=CKV_AZURE_35:Event Grid and the Flex Consumption host reach the account from outside any virtual network; every request needs Entra ID (shared keys are disabled).
  // checkov:skip=CKV_AZURE_59:As above: public endpoint, Entra ID only, no anonymous or key access.
  // checkov:skip=CKV_AZURE_43:The name is 'st' + uniqueString(): 15 lowercase letters and digits, which checkov cannot evaluate.
  name: 'st${suffix}'
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_ZRS' }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: { enabled: true, days: 7 }
    containerDeleteRetentionPolicy: { enabled: true, days: 7 }
  }
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [
  for name in [datasetsContainer, preparedContainer, deadLetterContainer, deploymentContainer]: {
    parent: blobService
    name: name
    properties: { publicAccess: 'None' }
  }
]

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource ledgerTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: runsTable
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Flex Consumption scales to zero; zone redundancy needs always-ready instances that bill while idle.
  name: 'plan-${suffix}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { tier: 'FlexConsumption', name: 'FC1' }
  properties: { reserved: true }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222:Event Grid delivers to the app's webhooks over the internet; every route needs a function or extension key.
  // checkov:skip=CKV_AZURE_17:Client certificates would refuse Event Grid's webhook deliveries.
  // checkov:skip=CKV_AZURE_212:Flex Consumption has no instance minimum: it scales to zero so it costs nothing idle.
  // checkov:skip=CKV_AZURE_213:Flex Consumption does not support App Service health checks; the platform restarts failed instances.
  name: functionAppName
  location: location
  tags: union(tags, { 'azd-service-name': 'app' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identity.id}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      remoteDebuggingEnabled: false
      // Every setting shared/settings.py reads (tests/test_infra.py keeps the two lists equal).
      appSettings: [
        { name: 'AzureWebJobsStorage__accountName', value: storage.name }
        { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
        { name: 'AzureWebJobsStorage__clientId', value: identity.properties.clientId }
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: insights.properties.ConnectionString }
        { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'ClientId=${identity.properties.clientId};Authorization=AAD' }
        { name: 'AZURE_CLIENT_ID', value: identity.properties.clientId }
        { name: 'ML_BACKEND', value: mlBackend }
        { name: 'JANITOR_SCHEDULE', value: janitorSchedule }
        { name: 'AZURE_SUBSCRIPTION_ID', value: subscription().subscriptionId }
        { name: 'AZURE_RESOURCE_GROUP', value: workspaceResourceGroupName }
        { name: 'AZUREML_WORKSPACE_NAME', value: workspaceName }
        { name: 'AZUREML_COMPUTE_CLUSTER', value: computeClusterName }
        { name: 'AZUREML_GPUS_PER_NODE', value: gpusPerNode }
        { name: 'AZUREML_COMPONENT_VERSION', value: '' }
        { name: 'AZUREML_INSTANCE_TYPE', value: inferenceInstanceType }
        { name: 'AZUREML_EXPERIMENT_NAME', value: 'chat_completion_finetune' }
        { name: 'AZUREML_DATASTORE', value: preparedDatastoreName }
        { name: 'AZUREML_FINETUNE_COMPUTE', value: finetuneCompute }
        { name: 'DATASET_TEST_PERCENT', value: '5' }
        { name: 'DATASET_SAMPLE_PERCENT', value: '100' }
        { name: 'DATASET_MIN_CONVERSATIONS', value: '10' }
        { name: 'DATASET_MAX_INVALID_FRACTION', value: '0' }
        { name: 'DATASET_MAX_SEQ_LENGTH', value: '4096' }
        { name: 'MAX_TRAINING_COST_USD', value: '0' }
        { name: 'PRICES_API_URL', value: 'https://prices.azure.com/api/retail/prices' }
        { name: 'VM_PRICES_USD_PER_HOUR', value: 'Standard_NC24ads_A100_v4=3.673,Standard_NC48ads_A100_v4=7.346,Standard_NC96ads_A100_v4=14.692,Standard_NC40ads_H100_v5=6.98' }
        { name: 'BASE_MODEL', value: baseModel }
        { name: 'ENDPOINT_REQUEST_TIMEOUT_S', value: '90' }
        { name: 'ENDPOINT_IDLE_MINUTES', value: '60' }
        { name: 'ENDPOINT_MIN_AGE_MINUTES', value: '30' }
        { name: 'ENDPOINT_UNOBSERVED_MAX_HOURS', value: '0' }
        { name: 'JANITOR_DRY_RUN', value: 'false' }
        { name: 'PROMOTION_MAX_LOSS_INCREASE_PERCENT', value: '1' }
        { name: 'GATE_CONVERSATIONS', value: '5' }
        { name: 'ROLLOUT_SHARE_PERCENT', value: '10' }
        { name: 'ROLLOUT_STEP_MINUTES', value: '15' }
        { name: 'ROLLBACK_WINDOW_HOURS', value: '24' }
        { name: 'JOB_EVENTS_TOPICS', value: workspaceId }
        { name: 'LIFECYCLE_TOPIC_ENDPOINT', value: lifecycleTopic.properties.endpoint }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainer}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: 40
        instanceMemoryMB: 2048
      }
      runtime: { name: 'python', version: '3.11' }
    }
  }
}

// Lifecycle events (FineTune.DatasetRejected, JobSubmitted, JobFailed, ModelDeployed,
// EndpointDeleted) for other systems to subscribe to; the app publishes with its identity.
resource lifecycleTopic 'Microsoft.EventGrid/topics@2024-06-01-preview' = {
  // checkov:skip=CKV_AZURE_193:The app on Flex Consumption publishes without virtual network integration; local auth is off, so only Entra ID identities with EventGrid Data Sender can publish.
  name: 'evgt-lifecycle-${suffix}'
  location: location
  tags: tags
  identity: { type: 'SystemAssigned' }
  properties: {
    inputSchema: 'EventGridSchema'
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
  }
}

resource lifecycleSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(lifecycleTopic.id, identity.id, roles.eventGridDataSender)
  scope: lifecycleTopic
  properties: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.eventGridDataSender)
  }
}

// Storage events for uploads to datasets/; the subscription that needs the function's blob
// extension key is created after deployment (infra/hooks/postdeploy.sh).
resource storageEvents 'Microsoft.EventGrid/systemTopics@2024-06-01-preview' = {
  name: 'evgt-storage-${suffix}'
  location: location
  tags: tags
  identity: { type: 'SystemAssigned' }
  properties: {
    source: storage.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

resource deadLetter 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: deadLetterContainer
}

resource preparedData 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: preparedContainer
}

// The function's identity: what the Functions host needs on AzureWebJobsStorage (blob owner for
// its locks and deployment package, queues for blob-trigger receipts), tables for the run ledger,
// and metrics publishing for Entra-authenticated Application Insights.
var functionStorageRoles = [
  roles.storageBlobDataOwner
  roles.storageQueueDataContributor
  roles.storageTableDataContributor
]

resource functionStorageAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in functionStorageRoles: {
    name: guid(storage.id, identity.id, role)
    scope: storage
    properties: {
      principalId: identity.properties.principalId
      principalType: 'ServicePrincipal'
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    }
  }
]

resource functionMetricsAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(insights.id, identity.id, roles.monitoringMetricsPublisher)
  scope: insights
  properties: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
  }
}

// Event Grid dead-letters undeliverable events into the dead-letter container, and only there.
resource deadLetterAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deadLetter.id, storageEvents.id, roles.storageBlobDataContributor)
  scope: deadLetter
  dependsOn: [containers]
  properties: {
    principalId: storageEvents.identity.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
  }
}

resource workspaceDeadLetterAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deadLetter.id, workspaceEventsPrincipalId, roles.storageBlobDataContributor)
  scope: deadLetter
  dependsOn: [containers]
  properties: {
    principalId: workspaceEventsPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
  }
}

// Jobs read the prepared training files with the GPU cluster's identity, and only those.
resource computePreparedAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(preparedData.id, computePrincipalId, roles.storageBlobDataReader)
  scope: preparedData
  dependsOn: [containers]
  properties: {
    principalId: computePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataReader)
  }
}

// The workspace reads them too, through the datastore (data preview in the studio).
resource workspacePreparedAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(preparedData.id, workspacePrincipalId, roles.storageBlobDataReader)
  scope: preparedData
  dependsOn: [containers]
  properties: {
    principalId: workspacePrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataReader)
  }
}

output functionAppName string = functionApp.name
output storageAccountName string = storage.name
output identityPrincipalId string = identity.properties.principalId
output storageEventsTopicName string = storageEvents.name
output deadLetterContainerName string = deadLetterContainer
output preparedContainerName string = preparedContainer
