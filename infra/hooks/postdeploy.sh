#!/bin/sh
# After `azd deploy`: the function app now has its extension keys, so create the Event Grid
# subscriptions that deliver uploads and job status events to it (infra/events.bicep).
set -eu

app="$AZURE_FUNCTION_APP_NAME"
group="$AZURE_RESOURCE_GROUP"

key() {
  az functionapp keys list --name "$app" --resource-group "$group" --query "systemKeys.$1" --output tsv
}

blobs_key=$(key blobs_extension)
eventgrid_key=$(key eventgrid_extension)
if [ -z "$blobs_key" ] || [ -z "$eventgrid_key" ]; then
  echo "The function app has no blobs_extension/eventgrid_extension key yet: is the code deployed? Run 'azd deploy' again." >&2
  exit 1
fi
host=$(az functionapp show --name "$app" --resource-group "$group" --query defaultHostName --output tsv)

az deployment sub create \
  --name "finetune-events-$AZURE_ENV_NAME" \
  --location "$AZURE_LOCATION" \
  --template-file "$(dirname "$0")/../events.bicep" \
  --parameters \
    appResourceGroup="$group" \
    workspaceResourceGroup="$AZUREML_WORKSPACE_RESOURCE_GROUP" \
    functionAppHostName="$host" \
    storageEventsTopicName="$STORAGE_EVENTS_TOPIC_NAME" \
    workspaceEventsTopicName="$WORKSPACE_EVENTS_TOPIC_NAME" \
    storageAccountName="$AZURE_STORAGE_ACCOUNT_NAME" \
    deadLetterContainer="$DEAD_LETTER_CONTAINER" \
    blobsExtensionKey="$blobs_key" \
    eventGridExtensionKey="$eventgrid_key" \
  --output none
echo "Event Grid subscriptions created: uploads to datasets/ and finished Azure ML jobs now reach $app."
