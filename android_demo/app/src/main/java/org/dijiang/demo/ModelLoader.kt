package org.dijiang.demo

import org.dijiang.demo.core.ChatFormat
import org.dijiang.demo.core.ChatSession
import org.dijiang.demo.core.DemoConfig
import org.dijiang.demo.core.PteMetadata
import org.dijiang.demo.core.SpecialTokens
import org.dijiang.demo.core.StateSize
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import java.io.File

/** A loaded model and the conversation over it. */
class LoadedModel(
    val config: DemoConfig,
    val engine: ExecuTorchEngine,
    val session: ChatSession,
    val metadata: PteMetadata,
    val stateSize: StateSize?
)

/** Reads what the chat needs from the exported files, then hands the .pte to the runner. */
object ModelLoader {
    fun load(config: DemoConfig): LoadedModel {
        val model = readable(config.modelPath)
        val tokenizer = readable(config.tokenizerPath)
        val metadata = readMetadata(model)
        metadata.problem()?.let { throw IllegalArgumentException("${model.name}: $it") }
        val eosTexts = SpecialTokens.fromTokenizerJson(tokenizer.readText()).contents(metadata.eosIds)
        val chatFormat = File(config.chatFormatPath)
        require(chatFormat.canRead()) {
            "cannot read ${chatFormat.path}: push the export folder's ${ChatFormat.FILE_NAME} beside the model"
        }
        val format = ChatFormat.fromJson(chatFormat.readText())
        val manifest = File(config.manifestPath)
        val state = if (manifest.canRead()) {
            StateSize.fromManifest(manifest.readText(), model.name, metadata.nLayers)
        } else {
            null
        }
        val seqLen = metadata.maxContextLen.coerceAtMost(Int.MAX_VALUE.toLong()).toInt()
        val engine = ExecuTorchEngine(model.path, tokenizer.path, config.temperature, seqLen)
        val session = ChatSession(engine, eosTexts, metadata.maxContextLen, format)
        return LoadedModel(config, engine, session, metadata, state)
    }

    private fun readable(path: String): File {
        val f = File(path)
        require(f.isFile && f.canRead()) { "cannot read $path" }
        return f
    }

    /** The constant methods, read with a throwaway Module (mmap: no copy of the weights). */
    private fun readMetadata(model: File): PteMetadata {
        val module = Module.load(model.path, Module.LOAD_MODE_MMAP)
        try {
            val methods = module.getMethods().toSet()
            return PteMetadata.read { name ->
                if (name in methods) module.execute(name).mapNotNull { asLong(it) } else null
            }
        } finally {
            module.destroy()
        }
    }

    private fun asLong(v: EValue): Long? = when {
        v.isInt -> v.toInt()
        v.isBool -> if (v.toBool()) 1L else 0L
        else -> null
    }
}
