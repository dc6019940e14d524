using System.Buffers.Binary;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.RegularExpressions;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora;

public static partial class LoraProber
{
    private sealed partial class Analysis
    {
        private const int MaxAlphaReads = 20_000;

        // ---- architecture (reference §3.3) ----

        private string DecideArchitecture(out string? mixed)
        {
            mixed = null;
            var e = new Evidence();
            var votes = new Dictionary<string, int>(StringComparer.Ordinal);
            foreach (ref readonly var m in Modules)
            {
                if (!m.Complete)
                {
                    continue;
                }
                if (m.Component == Component.Denoiser)
                {
                    var group = ClassifyDenoiser(in m, e);
                    if (group is not null)
                    {
                        CollectionsMarshal.GetValueRefOrAddDefault(votes, group, out _)++;
                    }
                }
                else if (m.Component is Component.TextEncoder1 or Component.TextEncoder2 or Component.TextEncoder3)
                {
                    CollectTextEncoder(in m, e);
                }
            }

            if (votes.ContainsKey("dit-blocks") && (votes.ContainsKey("flux-diffusers") || votes.ContainsKey(ArchitectureFamilies.QwenImage)))
            {
                var target = votes.ContainsKey("flux-diffusers") ? "flux-diffusers" : ArchitectureFamilies.QwenImage;
                votes[target] += votes["dit-blocks"];
                votes.Remove("dit-blocks");
            }

            var families = new Dictionary<string, int>(StringComparer.Ordinal);
            foreach (var (group, count) in votes)
            {
                if (group == "other")
                {
                    continue;
                }
                var family = group switch
                {
                    "flux" => FluxVariant(e),
                    "flux-diffusers" => e.Flux2Diffusers || e.DitHidden is 4096 or 6144 ? ArchitectureFamilies.Flux2 : ArchitectureFamilies.Flux1,
                    "dit-blocks" => e.DitHidden switch
                    {
                        3072 => e.MaxTransformerBlock > 18 ? ArchitectureFamilies.QwenImage : ArchitectureFamilies.Flux1,
                        1536 or 2432 => ArchitectureFamilies.Sd3,
                        4096 or 6144 => ArchitectureFamilies.Flux2,
                        _ => ArchitectureFamilies.Unknown,
                    },
                    "sd" => SdVariant(e),
                    "attn12-blocks" => e.SelfAttnHidden == 2048 ? ArchitectureFamilies.Ltx : ArchitectureFamilies.Unknown,
                    _ => group,
                };
                CollectionsMarshal.GetValueRefOrAddDefault(families, family, out _) += count;
            }
            families.Remove(ArchitectureFamilies.Unknown);

            if (families.Count > 1)
            {
                var ordered = families.OrderByDescending(kv => kv.Value).ThenBy(kv => kv.Key, StringComparer.Ordinal).ToList();
                mixed = string.Join(", ", ordered.Select(kv => $"{ArchitectureFamilies.Display(kv.Key)}: {kv.Value} modules"));
                _warnings.Add($"Modules point at more than one architecture ({mixed}).");
                return ordered[0].Key;
            }
            if (families.Count == 1)
            {
                var family = families.Keys.First();
                if (votes.TryGetValue("other", out var others))
                {
                    _warnings.Add($"{others} {ArchitectureFamilies.Display(family)} modules have names this prober does not recognise.");
                }
                return family;
            }
            if (votes.Count > 0)
            {
                // Denoiser modules that fit no known family: do not guess from the text encoder.
                return ArchitectureFamilies.Unknown;
            }
            return TextEncoderOnly(e);
        }

        private sealed class Evidence
        {
            public int Flux1Ratios, Flux2Ratios, MaxDouble = -1, MaxSingle = -1, MaxTransformerBlock = -1;
            public long FluxHidden, DitHidden, SelfAttnHidden;
            public bool Flux2Diffusers, HasModulation;
            public int SdxlMarkers, Sd12Markers;
            public readonly HashSet<long> Attn2Dims = [];
            public int ProjIn2D, ProjIn4D;
            public long ClipWidth;
            public int ClipMaxLayer = -1;
            public bool ClipTe2, T5Te2, Te3, NonClipTe;
        }

        private string? ClassifyDenoiser(in Module m, Evidence e)
        {
            var n = Normalized(in m);
            if (n.StartsWith("double_blocks_", StringComparison.Ordinal) || n.StartsWith("single_blocks_", StringComparison.Ordinal))
            {
                if (n.EndsWith("_img_mod_linear", StringComparison.Ordinal) || n.EndsWith("_txt_mod_linear", StringComparison.Ordinal)
                    || n.EndsWith("_img_mlp_fc1", StringComparison.Ordinal) || n.EndsWith("_img_mlp_fc2", StringComparison.Ordinal)
                    || n.EndsWith("_txt_mlp_fc1", StringComparison.Ordinal) || n.EndsWith("_txt_mlp_fc2", StringComparison.Ordinal)
                    || n.EndsWith("_modulation_linear", StringComparison.Ordinal))
                {
                    return ArchitectureFamilies.HunyuanVideo;
                }
                var isDouble = n[0] == 'd';
                var index = LeadingIndex(n, isDouble ? 14 : 14);
                if (isDouble)
                {
                    e.MaxDouble = Math.Max(e.MaxDouble, index);
                }
                else
                {
                    e.MaxSingle = Math.Max(e.MaxSingle, index);
                }
                long input = InDim(in m), output = OutDim(in m);
                if (n.EndsWith("_linear1", StringComparison.Ordinal) && input > 0)
                {
                    e.FluxHidden = input;
                    e.Flux1Ratios += output == 7 * input ? 1 : 0;
                    e.Flux2Ratios += output == 9 * input ? 1 : 0;
                }
                else if (n.EndsWith("_linear2", StringComparison.Ordinal) && output > 0)
                {
                    e.FluxHidden = output;
                    e.Flux1Ratios += input == 5 * output ? 1 : 0;
                    e.Flux2Ratios += input == 4 * output ? 1 : 0;
                }
                else if ((n.EndsWith("_img_mlp_0", StringComparison.Ordinal) || n.EndsWith("_txt_mlp_0", StringComparison.Ordinal)) && input > 0)
                {
                    e.FluxHidden = input;
                    e.Flux1Ratios += output == 4 * input ? 1 : 0;
                    e.Flux2Ratios += output == 6 * input ? 1 : 0;
                }
                else if (n.EndsWith("_attn_qkv", StringComparison.Ordinal) || n.EndsWith("_qkv_lora1", StringComparison.Ordinal) || n.EndsWith("_qkv_lora2", StringComparison.Ordinal))
                {
                    e.FluxHidden = input;
                }
                if (n.EndsWith("_mod_lin", StringComparison.Ordinal) || n.EndsWith("_modulation_lin", StringComparison.Ordinal))
                {
                    // FLUX.2 has no per-block modulation layers.
                    e.HasModulation = true;
                }
                return "flux";
            }
            if (n is "img_in" or "txt_in" or "x_embedder" or "context_embedder" or "proj_out" or "norm_out_linear" or "pos_embed"
                || n.StartsWith("time_in_", StringComparison.Ordinal) || n.StartsWith("vector_in_", StringComparison.Ordinal)
                || n.StartsWith("guidance_in_", StringComparison.Ordinal) || n.StartsWith("final_layer_", StringComparison.Ordinal)
                || n.StartsWith("time_text_embed_", StringComparison.Ordinal)
                || n.StartsWith("text_embedding_", StringComparison.Ordinal) || n.StartsWith("time_embedding_", StringComparison.Ordinal)
                || n.StartsWith("time_projection_", StringComparison.Ordinal) || n.StartsWith("img_emb_", StringComparison.Ordinal)
                || n is "head_head")
            {
                // Embedders and heads exist in several DiTs/UNets and say nothing about which one.
                return null;
            }
            if (n.StartsWith("single_transformer_blocks_", StringComparison.Ordinal))
            {
                e.Flux2Diffusers |= n.Contains("to_qkv_mlp_proj", StringComparison.Ordinal);
                if (n.EndsWith("_attn_to_q", StringComparison.Ordinal) || n.EndsWith("_attn_to_k", StringComparison.Ordinal))
                {
                    e.DitHidden = InDim(in m);
                }
                return "flux-diffusers";
            }
            if (n.StartsWith("transformer_blocks_", StringComparison.Ordinal))
            {
                e.MaxTransformerBlock = Math.Max(e.MaxTransformerBlock, LeadingIndex(n, 19));
                if (n.Contains("_img_mlp_", StringComparison.Ordinal) || n.Contains("_txt_mlp_", StringComparison.Ordinal)
                    || n.Contains("_img_mod_", StringComparison.Ordinal) || n.Contains("_txt_mod_", StringComparison.Ordinal))
                {
                    return ArchitectureFamilies.QwenImage;
                }
                if (n.EndsWith("_attn_to_q", StringComparison.Ordinal) || n.EndsWith("_attn_to_k", StringComparison.Ordinal) || n.EndsWith("_attn_to_v", StringComparison.Ordinal))
                {
                    e.DitHidden = InDim(in m);
                }
                if (n.Contains("_attn1_", StringComparison.Ordinal) || n.Contains("_attn2_", StringComparison.Ordinal))
                {
                    // attn1/attn2 blocks: LTX-Video (hidden 2048), but also PixArt (1152) and Sana (2240).
                    if (n.EndsWith("_attn1_to_q", StringComparison.Ordinal))
                    {
                        e.SelfAttnHidden = InDim(in m);
                    }
                    return "attn12-blocks";
                }
                return "dit-blocks";
            }
            if (n.StartsWith("joint_blocks_", StringComparison.Ordinal))
            {
                return ArchitectureFamilies.Sd3;
            }
            if (n.StartsWith("blocks_", StringComparison.Ordinal))
            {
                return WanRegex().IsMatch(n) ? ArchitectureFamilies.Wan
                    : AnimaRegex().IsMatch(n) ? ArchitectureFamilies.Anima
                    : Krea2Regex().IsMatch(n) ? ArchitectureFamilies.Krea2
                    : "other";
            }
            if (n.StartsWith("txtfusion_", StringComparison.Ordinal) || n.StartsWith("tmlp_", StringComparison.Ordinal) || n.StartsWith("tproj_", StringComparison.Ordinal)
                || n is "first" or "last_linear")
            {
                return ArchitectureFamilies.Krea2;
            }
            if (n.StartsWith("down_blocks_", StringComparison.Ordinal) || n.StartsWith("up_blocks_", StringComparison.Ordinal)
                || n.StartsWith("mid_block_", StringComparison.Ordinal) || n.StartsWith("input_blocks_", StringComparison.Ordinal)
                || n.StartsWith("middle_block_", StringComparison.Ordinal) || n.StartsWith("output_blocks_", StringComparison.Ordinal)
                || n.StartsWith("conv_in", StringComparison.Ordinal) || n.StartsWith("conv_out", StringComparison.Ordinal)
                || n.StartsWith("conv_norm_out", StringComparison.Ordinal) || n.StartsWith("time_embed_", StringComparison.Ordinal)
                || n.StartsWith("label_emb_", StringComparison.Ordinal) || n.StartsWith("add_embedding_", StringComparison.Ordinal)
                || n is "out_0" or "out_2")
            {
                CollectSd(in m, e);
                return "sd";
            }
            if (LanguageModelRegex().IsMatch(n))
            {
                return ArchitectureFamilies.LanguageModel;
            }
            return "other";
        }

        private void CollectSd(in Module m, Evidence e)
        {
            var n = Normalized(in m);
            if (n.EndsWith("attn2_to_k", StringComparison.Ordinal) || n.EndsWith("attn2_to_v", StringComparison.Ordinal))
            {
                e.Attn2Dims.Add(InDim(in m));
            }
            if (n.EndsWith("_proj_in", StringComparison.Ordinal) && m.Down >= 0)
            {
                if (Shape(m.Down).Length == 4)
                {
                    e.ProjIn4D++;
                }
                else
                {
                    e.ProjIn2D++;
                }
            }
            if (n.StartsWith("up_blocks_0_attentions", StringComparison.Ordinal) || IsSdxlOnlyBlock(n))
            {
                e.SdxlMarkers++;
            }
            var deep = n.IndexOf("_transformer_blocks_", StringComparison.Ordinal);
            if (deep >= 0 && LeadingIndex(n, deep + 20) >= 2)
            {
                e.SdxlMarkers++;
            }
            if (n.StartsWith("down_blocks_0_attentions", StringComparison.Ordinal) || n.StartsWith("up_blocks_3_attentions", StringComparison.Ordinal) || IsSd12OnlyBlock(n))
            {
                e.Sd12Markers++;
            }
        }

        private void CollectTextEncoder(in Module m, Evidence e)
        {
            var n = Normalized(in m);
            if (n.StartsWith("text_model_encoder_layers_", StringComparison.Ordinal))
            {
                if (m.Component == Component.TextEncoder2)
                {
                    e.ClipTe2 = true;
                    return;
                }
                if (m.Component == Component.TextEncoder3)
                {
                    e.Te3 = true;
                    return;
                }
                var layer = LeadingIndex(n, 26);
                e.ClipMaxLayer = Math.Max(e.ClipMaxLayer, layer);
                if (n.EndsWith("_self_attn_q_proj", StringComparison.Ordinal) || n.EndsWith("_self_attn_k_proj", StringComparison.Ordinal))
                {
                    e.ClipWidth = InDim(in m);
                }
                return;
            }
            if (m.Component == Component.TextEncoder2 && n.StartsWith("encoder_block", StringComparison.Ordinal))
            {
                e.T5Te2 = true;
            }
            else if (m.Component == Component.TextEncoder3)
            {
                e.Te3 = true;
            }
            else
            {
                e.NonClipTe = true;
            }
        }

        private string FluxVariant(Evidence e)
        {
            if (e.Flux2Ratios > e.Flux1Ratios)
            {
                return ArchitectureFamilies.Flux2;
            }
            if (e.Flux1Ratios > 0 || e.HasModulation)
            {
                return ArchitectureFamilies.Flux1;
            }
            if (e.FluxHidden is 4096 or 6144 || e.MaxDouble > 18 || e.MaxSingle > 37)
            {
                return ArchitectureFamilies.Flux2;
            }
            return MetadataFamily() == ArchitectureFamilies.Flux2 ? ArchitectureFamilies.Flux2 : ArchitectureFamilies.Flux1;
        }

        private string SdVariant(Evidence e)
        {
            if (e.Attn2Dims.Contains(2048) || e.Attn2Dims.Contains(1280 + 768))
            {
                return ArchitectureFamilies.Sdxl;
            }
            if (e.Attn2Dims.Contains(1024))
            {
                return ArchitectureFamilies.Sd2;
            }
            if (e.Attn2Dims.Contains(768))
            {
                return ArchitectureFamilies.Sd1;
            }
            if (e.SdxlMarkers > e.Sd12Markers || (e.SdxlMarkers == 0 && e.Sd12Markers == 0 && e.ClipTe2))
            {
                return ArchitectureFamilies.Sdxl;
            }
            if (e.Sd12Markers > 0)
            {
                if (e.ClipWidth == 1024 || e.ClipMaxLayer >= 12 || e.ProjIn2D > 0)
                {
                    return ArchitectureFamilies.Sd2;
                }
                if (e.ClipWidth == 768 || e.ProjIn4D > 0)
                {
                    return ArchitectureFamilies.Sd1;
                }
                return MetadataFamily() == ArchitectureFamilies.Sd2 ? ArchitectureFamilies.Sd2 : ArchitectureFamilies.Sd1;
            }
            var hint = MetadataFamily();
            if (hint is ArchitectureFamilies.Sd1 or ArchitectureFamilies.Sd2 or ArchitectureFamilies.Sdxl)
            {
                _warnings.Add($"The UNet modules fit SD 1.x, 2.x and SDXL alike; metadata decided {ArchitectureFamilies.Display(hint)}.");
                return hint;
            }
            return ArchitectureFamilies.Unknown;
        }

        private string TextEncoderOnly(Evidence e)
        {
            if (e.T5Te2)
            {
                return ArchitectureFamilies.Flux1;
            }
            if (e.ClipTe2)
            {
                return e.Te3 ? ArchitectureFamilies.Sd3 : ArchitectureFamilies.Sdxl;
            }
            if (e.ClipWidth == 1024 || e.ClipMaxLayer >= 12)
            {
                return ArchitectureFamilies.Sd2;
            }
            if (e.ClipWidth == 768 || e.ClipMaxLayer >= 0)
            {
                var hint = MetadataFamily();
                var family = hint is ArchitectureFamilies.Sdxl or ArchitectureFamilies.Flux1 or ArchitectureFamilies.Sd3 ? hint : ArchitectureFamilies.Sd1;
                _warnings.Add($"Only the CLIP-L text encoder is adapted, which SD 1.x, SDXL and FLUX.1 share; {ArchitectureFamilies.Display(family)} assumed.");
                return family;
            }
            return ArchitectureFamilies.Unknown;
        }

        private static int LeadingIndex(ReadOnlySpan<char> name, int start)
        {
            var index = 0;
            var digits = 0;
            for (var i = start; i < name.Length && char.IsAsciiDigit(name[i]) && digits < 6; i++, digits++)
            {
                index = index * 10 + (name[i] - '0');
            }
            return digits == 0 ? -1 : index;
        }

        [GeneratedRegex(@"^blocks_\d+_((self|cross)_attn_(q|k|v|o|k_img|v_img|norm_q|norm_k)|ffn_(0|2))\z", RegexOptions.CultureInvariant)]
        private static partial Regex WanRegex();

        [GeneratedRegex(@"^blocks_\d+_((self|cross)_attn_(q|k|v|output)_proj|adaln_modulation_\w+|mlp_layer\d)\z", RegexOptions.CultureInvariant)]
        private static partial Regex AnimaRegex();

        [GeneratedRegex(@"^blocks_\d+_(attn_(wq|wk|wv|wo|gate)|mlp_(up|down|gate))\z", RegexOptions.CultureInvariant)]
        private static partial Regex Krea2Regex();

        [GeneratedRegex(@"^(model_)?(layers_\d+_(self_attn|mlp)_\w+|embed_tokens|lm_head)\z", RegexOptions.CultureInvariant)]
        private static partial Regex LanguageModelRegex();

        // SAI names: SDXL's attention blocks sit at output_blocks 0-2 (SD 1/2 has resnets only there).
        // Exactly ^output_blocks_[0-2]_1_(transformer_blocks|proj_in|proj_out|norm), without a regex per module.
        private static bool IsSdxlOnlyBlock(ReadOnlySpan<char> n)
        {
            var rest = n;
            if (!rest.StartsWith("output_blocks_") || rest.Length < 18 || rest[14] is < '0' or > '2' || !rest[15..].StartsWith("_1_"))
            {
                return false;
            }
            rest = rest[18..];
            return rest.StartsWith("transformer_blocks") || rest.StartsWith("proj_in") || rest.StartsWith("proj_out") || rest.StartsWith("norm");
        }

        // SD 1/2 has attention at input_blocks 1-2 and output_blocks 6-11; SDXL has none there.
        // Exactly ^(input_blocks_[12]_1_|output_blocks_([6-9]|1[01])_1_).
        private static bool IsSd12OnlyBlock(ReadOnlySpan<char> n)
        {
            var rest = n;
            if (rest.StartsWith("input_blocks_"))
            {
                rest = rest[13..];
                return rest.Length >= 4 && rest[0] is '1' or '2' && rest[1..].StartsWith("_1_");
            }
            if (rest.StartsWith("output_blocks_"))
            {
                rest = rest[14..];
                var digits = rest.Length >= 1 && rest[0] is >= '6' and <= '9' ? 1
                    : rest.Length >= 2 && rest[0] == '1' && rest[1] is '0' or '1' ? 2
                    : 0;
                return digits > 0 && rest[digits..].StartsWith("_1_");
            }
            return false;
        }


        // ---- metadata ----

        private string? NonEmpty(string key) =>
            _metadata.TryGetValue(key, out var value) && !string.IsNullOrWhiteSpace(value) ? value : null;

        /// <summary>The family the trainer's metadata claims, or null. A hint only: ai-toolkit writes sd_1.5 for FLUX.</summary>
        private string? MetadataFamily()
        {
            var hint = (NonEmpty("modelspec.architecture") ?? NonEmpty("ss_base_model_version"))?.ToLowerInvariant();
            if (hint is null)
            {
                return NonEmpty("ss_v2") == "True" ? ArchitectureFamilies.Sd2 : null;
            }
            return hint switch
            {
                _ when hint.Contains("xl") => ArchitectureFamilies.Sdxl,
                _ when hint.Contains("flux.2") || hint.Contains("flux-2") || hint.Contains("flux2") || hint.Contains("flux_2") => ArchitectureFamilies.Flux2,
                _ when hint.Contains("flux") || hint.Contains("chroma") => ArchitectureFamilies.Flux1,
                _ when hint.Contains("stable-diffusion-3") || hint.Contains("sd3") || hint is "medium" or "5-large" or "5-medium" => ArchitectureFamilies.Sd3,
                _ when hint.Contains("v2") || hint.Contains("sd_2") || hint.Contains("sd2") => ArchitectureFamilies.Sd2,
                _ when hint.Contains("v1") || hint.Contains("sd_1") || hint.Contains("sd1") => ArchitectureFamilies.Sd1,
                _ when hint.Contains("wan") => ArchitectureFamilies.Wan,
                _ when hint.Contains("qwen") => ArchitectureFamilies.QwenImage,
                _ when hint.Contains("hunyuan-video") || hint.Contains("hunyuan_video") => ArchitectureFamilies.HunyuanVideo,
                _ when hint.Contains("anima") => ArchitectureFamilies.Anima,
                _ => null,
            };
        }

        private void CheckMetadataAgreement(string architecture)
        {
            var claimed = MetadataFamily();
            if (claimed is not null && architecture != ArchitectureFamilies.Unknown && claimed != architecture)
            {
                var text = NonEmpty("modelspec.architecture") ?? NonEmpty("ss_base_model_version") ?? "ss_v2";
                _warnings.Add($"Metadata says '{Truncate(text, 80)}' but the keys say {ArchitectureFamilies.Display(architecture)}; the keys win.");
            }
        }

        private static readonly HashSet<string> ShownMetadataKeys = new(StringComparer.Ordinal)
        {
            "ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
            "ss_base_model_version", "ss_sd_model_name", "ss_training_comment", "ss_epoch", "ss_steps",
            "ss_num_train_images", "ss_resolution", "ss_learning_rate", "ss_clip_skip",
            "ss_training_started_at", "ss_training_finished_at", "ss_v2", "sshs_model_hash",
            "training_info", "software", "format",
        };

        private IReadOnlyDictionary<string, string> SelectedMetadata()
        {
            var selected = new SortedDictionary<string, string>(StringComparer.Ordinal);
            foreach (var (key, value) in _metadata)
            {
                var show = ShownMetadataKeys.Contains(key)
                    || (key.StartsWith("modelspec.", StringComparison.Ordinal) && key != "modelspec.thumbnail");
                if (show && !string.IsNullOrWhiteSpace(value))
                {
                    selected[key] = Truncate(value, MaxMetadataValueLength);
                }
            }
            return selected;
        }

        private (IReadOnlyList<string> TriggerWords, IReadOnlyList<TagCount> TopTags) TagsFromMetadata()
        {
            var triggers = new List<string>();
            if (NonEmpty("modelspec.trigger_phrase") is { } phrase)
            {
                triggers.AddRange(phrase.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries));
            }
            var totals = new Dictionary<string, int>(StringComparer.Ordinal);
            if (NonEmpty("ss_tag_frequency") is { } json)
            {
                try
                {
                    using var doc = JsonDocument.Parse(json);
                    if (doc.RootElement.ValueKind == JsonValueKind.Object)
                    {
                        foreach (var folder in doc.RootElement.EnumerateObject())
                        {
                            // kohya DreamBooth folders are "<repeats>_<concept>"; the concept is the trigger word
                            // when it also appears among the folder's caption tags.
                            var concept = FolderConcept(folder.Name);
                            if (folder.Value.ValueKind != JsonValueKind.Object)
                            {
                                continue;
                            }
                            foreach (var tag in folder.Value.EnumerateObject())
                            {
                                if (tag.Value.ValueKind == JsonValueKind.Number && tag.Value.TryGetInt32(out var count))
                                {
                                    var name = tag.Name.Trim();
                                    totals[name] = totals.GetValueOrDefault(name) + count;
                                    if (concept is not null && string.Equals(name, concept, StringComparison.OrdinalIgnoreCase))
                                    {
                                        triggers.Add(name);
                                    }
                                }
                            }
                        }
                    }
                }
                catch (JsonException)
                {
                    _warnings.Add("ss_tag_frequency is not valid JSON; tags were skipped.");
                }
            }
            var top = totals
                .OrderByDescending(kv => kv.Value)
                .ThenBy(kv => kv.Key, StringComparer.Ordinal)
                .Take(TopTagCount)
                .Select(kv => new TagCount(kv.Key, kv.Value))
                .ToList();
            return ([.. triggers.Distinct(StringComparer.OrdinalIgnoreCase).Take(20)], top);
        }

        private static string? FolderConcept(string folder)
        {
            var underscore = folder.IndexOf('_');
            if (underscore <= 0 || folder.AsSpan(0, underscore).ContainsAnyExceptInRange('0', '9'))
            {
                return null;
            }
            var concept = folder[(underscore + 1)..].Trim();
            return concept.Length > 0 ? concept : null;
        }

        private static string Truncate(string value, int max) => value.Length <= max ? value : value[..max] + "…";

        // ---- rank, alpha, scale, pairing ----

        private (int? RankMin, int? RankMax, double? Alpha, double? Scale) RanksAndScale()
        {
            int? rankMin = null, rankMax = null;
            double? alphaValue = null;
            var alphaUniform = true;
            var sawAlpha = false;
            double scaleMin = double.PositiveInfinity, scaleMax = double.NegativeInfinity;
            var metadataAlpha = ParseDouble(NonEmpty("ss_network_alpha"));
            var peftScale = PeftScale();
            var alphaReads = 0;
            var alphaUnreadable = false;

            foreach (ref readonly var m in Modules)
            {
                if (!m.Complete)
                {
                    continue;
                }
                var rank = Rank(in m);
                if (rank is > 0)
                {
                    rankMin = Math.Min(rankMin ?? int.MaxValue, rank.Value);
                    rankMax = Math.Max(rankMax ?? 0, rank.Value);
                }
                if (m.HasDiff || m.HasNorm || m.HasIa3 || m.HasOft || m.HasEmbedding)
                {
                    continue;
                }

                double? alpha = null;
                if (m.Alpha >= 0)
                {
                    alpha = alphaReads++ < MaxAlphaReads ? ReadScalar(m.Alpha) : null;
                    alpha ??= metadataAlpha;
                    alphaUnreadable |= alpha is null;
                }
                if (alpha is { } a)
                {
                    sawAlpha = true;
                    alphaUniform &= alphaValue is null || alphaValue == a;
                    alphaValue ??= a;
                }

                // Missing alpha means scale 1 (kohya, ComfyUI, A1111, PEFT); an undecomposed LoKr has no rank.
                var scale = alpha is { } al && rank is > 0 ? al / rank.Value
                    : m.Alpha < 0 && m.Down >= 0 && peftScale is { } ps ? ps
                    : m.Alpha >= 0 && alpha is null ? double.NaN
                    : 1.0;
                if (!double.IsNaN(scale))
                {
                    scaleMin = Math.Min(scaleMin, scale);
                    scaleMax = Math.Max(scaleMax, scale);
                }
            }

            if (alphaUnreadable)
            {
                _warnings.Add("Alpha values were not read (no file stream and no ss_network_alpha), so the scale is unknown.");
            }
            if (sawAlpha && !alphaUniform)
            {
                _warnings.Add("Alpha differs between modules.");
            }
            if (alphaValue is { } av && !double.IsFinite(av))
            {
                _warnings.Add("An alpha value is not a finite number.");
            }
            if (sawAlpha && alphaUniform && alphaValue == 0)
            {
                _warnings.Add("Alpha is 0: ComfyUI applies that as scale 0 (no effect) while kohya treats it as alpha = rank.");
            }
            double? uniformScale = null;
            if (alphaValue is { } finite && !double.IsFinite(finite))
            {
                // JSON has no NaN/Infinity; the warning above carries the information.
                alphaValue = null;
                alphaUnreadable = true;
            }
            if (scaleMin <= scaleMax && double.IsFinite(scaleMin) && double.IsFinite(scaleMax) && !alphaUnreadable)
            {
                if (scaleMax - scaleMin <= 1e-9 * Math.Max(1, Math.Abs(scaleMax)))
                {
                    uniformScale = Math.Round(scaleMin, 6);
                }
                else
                {
                    _warnings.Add(string.Create(CultureInfo.InvariantCulture, $"The effective scale (alpha/rank) varies from {scaleMin:0.####} to {scaleMax:0.####} across modules."));
                }
            }
            return (rankMin, rankMax, sawAlpha && alphaUniform ? alphaValue : null, uniformScale);
        }

        private double? ReadScalar(int index)
        {
            ref readonly var tensor = ref _table[index];
            if (_file is null || _table.ElementCount(index) != 1 || tensor.ByteLength > 8)
            {
                return null;
            }
            Span<byte> bytes = stackalloc byte[8];
            bytes = bytes[..(int)tensor.ByteLength];
            _file.Position = _dataOffset + tensor.DataStart;
            if (_file.ReadAtLeast(bytes, bytes.Length, throwOnEndOfStream: false) < bytes.Length)
            {
                return null;
            }
            return _table.Dtype(index) switch
            {
                "F16" => (double)BinaryPrimitives.ReadHalfLittleEndian(bytes),
                "BF16" => BitConverter.Int32BitsToSingle(BinaryPrimitives.ReadUInt16LittleEndian(bytes) << 16),
                "F32" => BinaryPrimitives.ReadSingleLittleEndian(bytes),
                "F64" => BinaryPrimitives.ReadDoubleLittleEndian(bytes),
                "I64" => BinaryPrimitives.ReadInt64LittleEndian(bytes),
                "I32" => BinaryPrimitives.ReadInt32LittleEndian(bytes),
                _ => null,
            };
        }

        // diffusers/PEFT keep lora_alpha and r in the lora_adapter_metadata JSON instead of tensors.
        private double? PeftScale()
        {
            if (NonEmpty("lora_adapter_metadata") is not { } json)
            {
                return null;
            }
            try
            {
                using var doc = JsonDocument.Parse(json);
                var root = doc.RootElement;
                if (root.ValueKind == JsonValueKind.Object
                    && root.TryGetProperty("lora_alpha", out var alpha) && alpha.TryGetDouble(out var a)
                    && root.TryGetProperty("r", out var r) && r.TryGetDouble(out var rank) && rank > 0)
                {
                    var rs = root.TryGetProperty("use_rslora", out var flag) && flag.ValueKind == JsonValueKind.True;
                    return rs ? a / Math.Sqrt(rank) : a / rank;
                }
            }
            catch (JsonException)
            {
                _warnings.Add("lora_adapter_metadata is not valid JSON.");
            }
            return null;
        }

        private static double? ParseDouble(string? text) =>
            double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var value) ? value : null;

        private void CheckPairs()
        {
            var mismatched = 0;
            var firstMismatched = -1;
            var halves = 0;
            for (var i = 0; i < _moduleCount; i++)
            {
                ref readonly var m = ref _modules[i];
                if (m.Complete && Shape(m.Down) is { Length: >= 1 } down && Shape(m.Up) is { Length: >= 2 } up && up[1] != down[0])
                {
                    firstMismatched = mismatched++ == 0 ? i : firstMismatched;
                }
                halves += (m.Down < 0) != (m.Up < 0) && !m.Complete ? 1 : 0;
            }
            if (mismatched > 0)
            {
                _warnings.Add($"{mismatched} modules have lora_up and lora_down of different ranks (e.g. '{Name(firstMismatched)}').");
            }
            if (halves > 0)
            {
                _warnings.Add($"{halves} modules have only one of lora_down/lora_up.");
            }
            if (_firstUnknownKey is not null)
            {
                _warnings.Add($"{_unknownKeyCount} tensors are not LoRA-family parameters (e.g. '{Truncate(_firstUnknownKey, 120)}').");
            }
        }
    }
}
