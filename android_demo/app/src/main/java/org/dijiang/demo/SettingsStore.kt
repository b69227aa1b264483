package org.dijiang.demo

import android.content.Context
import org.dijiang.demo.core.DemoConfig
import java.io.File

/** The settings in SharedPreferences; unset fields take [defaults]. */
class SettingsStore(context: Context) {
    private val prefs = context.getSharedPreferences("settings", Context.MODE_PRIVATE)
    private val appDir: File? = context.getExternalFilesDir(null)

    /**
     * Where the files are looked for by default: /data/local/tmp/dijiang (adb push), or the
     * app's own external folder when the model was pushed there instead.
     */
    val defaults: DemoConfig
        get() {
            val d = DemoConfig.DEFAULT
            val own = appDir?.let { File(it, "model.pte") }
            return if (!File(d.modelPath).isFile && own != null && own.isFile) {
                d.copy(modelPath = own.path, tokenizerPath = File(appDir, "tokenizer.json").path)
            } else {
                d
            }
        }

    fun load(): DemoConfig {
        val d = defaults
        return DemoConfig(
            modelPath = prefs.getString(MODEL, null) ?: d.modelPath,
            tokenizerPath = prefs.getString(TOKENIZER, null) ?: d.tokenizerPath,
            temperature = prefs.getFloat(TEMPERATURE, d.temperature),
            maxNewTokens = prefs.getInt(MAX_TOKENS, d.maxNewTokens)
        )
    }

    fun save(config: DemoConfig) {
        prefs.edit()
            .putString(MODEL, config.modelPath)
            .putString(TOKENIZER, config.tokenizerPath)
            .putFloat(TEMPERATURE, config.temperature)
            .putInt(MAX_TOKENS, config.maxNewTokens)
            .apply()
    }

    private companion object {
        const val MODEL = "model_path"
        const val TOKENIZER = "tokenizer_path"
        const val TEMPERATURE = "temperature"
        const val MAX_TOKENS = "max_new_tokens"
    }
}
