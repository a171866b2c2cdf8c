-- Argo CD health of a parley.dev Chatbot.
-- Degraded: the operator refused the spec (InvalidSpec, ConfigTooLarge), cannot apply
-- (ApplyFailed), or cannot apply the Kong edge layer the spec asks for (KongReady=False).
-- Progressing: the operator has not seen this generation yet, or fewer gateway pods are
-- ready than the spec's minimum. Healthy: rendered, applied, and enough pods ready.
local hs = {}

local function condition(status, type)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local function wanted_replicas(spec)
  local gateway = spec and spec.gateway
  if gateway == nil then
    return 1
  end
  if gateway.autoscaling ~= nil and gateway.autoscaling.minReplicas ~= nil then
    return gateway.autoscaling.minReplicas
  end
  if gateway.replicas ~= nil then
    return gateway.replicas
  end
  return 1
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if status == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. tostring(generation)
  return hs
end

local ready = condition(status, "Ready")
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if ready.status ~= "True" then
  hs.status = "Degraded"
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
  return hs
end

local kong = condition(status, "KongReady")
if kong ~= nil and kong.status == "False" then
  hs.status = "Degraded"
  hs.message = (kong.reason or "KongNotReady") .. ": " .. (kong.message or "")
  return hs
end

local want = wanted_replicas(obj.spec)
local have = status.readyReplicas or 0
if have < want then
  hs.status = "Progressing"
  hs.message = tostring(have) .. "/" .. tostring(want) .. " gateway pods ready"
  return hs
end

hs.status = "Healthy"
hs.message = ready.message or "Ready"
return hs
