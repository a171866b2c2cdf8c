-- Argo CD health of a parley.dev Tenant.
-- Degraded: Ready=False (e.g. MissingSecret: a Secret or key the spec names does not
-- exist). Progressing: the operator has not seen this generation yet. Healthy: Ready.
local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if status == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. tostring(generation)
  return hs
end
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Ready" then
      if c.status == "True" then
        hs.status = "Healthy"
      else
        hs.status = "Degraded"
      end
      hs.message = (c.reason or "") .. ": " .. (c.message or "")
      return hs
    end
  end
end
hs.status = "Progressing"
hs.message = "Waiting for the Ready condition"
return hs
